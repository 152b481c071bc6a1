//! Bitbucket's rolling-upgrade API through several addresses: the load balancer's URL first, then
//! the nodes' own URLs, so the coordinator keeps its view while the node behind one URL is stopped.

use crate::zdu::{ClusterView, Secret, ZduClient, ZduError};
use std::time::Duration;

pub struct ZduPool {
    clients: Vec<ZduClient>,
}

/// Whether the request never reached Bitbucket (so another address may be tried, even for a POST).
fn not_sent(e: &ZduError) -> bool {
    matches!(e, ZduError::Connect { .. })
}

fn unreachable(e: &ZduError) -> bool {
    matches!(e, ZduError::Connect { .. } | ZduError::Timeout { .. })
        || matches!(e, ZduError::Status { code, .. } if *code >= 500)
}

impl ZduPool {
    pub fn new(urls: &[String], token: Secret, timeout: Duration) -> Result<Self, ZduError> {
        let clients = urls
            .iter()
            .map(|u| ZduClient::new(u, token.clone(), timeout))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { clients })
    }

    pub async fn cluster(&self) -> Result<ClusterView, ZduError> {
        let mut last = None;
        for c in &self.clients {
            match c.cluster().await {
                Ok(v) => return Ok(v),
                Err(e) if unreachable(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ZduError::Config("no Bitbucket URL configured".into())))
    }

    async fn post<'a, F, Fut>(&'a self, f: F) -> Result<(), ZduError>
    where
        F: Fn(&'a ZduClient) -> Fut,
        Fut: std::future::Future<Output = Result<(), ZduError>>,
    {
        let mut last = None;
        for c in &self.clients {
            match f(c).await {
                Ok(()) => return Ok(()),
                Err(e) if not_sent(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ZduError::Config("no Bitbucket URL configured".into())))
    }

    pub async fn start(&self) -> Result<(), ZduError> {
        self.post(|c| c.start()).await
    }

    pub async fn cancel(&self) -> Result<(), ZduError> {
        self.post(|c| c.cancel()).await
    }

    pub async fn approve(&self) -> Result<(), ZduError> {
        self.post(|c| c.approve()).await
    }
}
