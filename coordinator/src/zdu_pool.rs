//! Bitbucket's rolling-upgrade API through several addresses: the load balancer's URL first, then
//! the nodes' own URLs, so the coordinator keeps its view while the node behind one URL is stopped.

use crate::inventory::{Auth, Cluster, SecretSource};
use crate::zdu::{ClusterView, Credentials, Secret, SecretError, ZduClient, ZduError};
use std::time::Duration;

fn load(source: &SecretSource) -> Result<Secret, SecretError> {
    match source {
        SecretSource::File(p) => Secret::from_file(p),
        SecretSource::Env(v) => Secret::from_env(v),
    }
}

/// The cluster's credentials, read from their file or variable (blocking; once per command).
pub fn credentials(auth: &Auth) -> Result<Credentials, SecretError> {
    Ok(match auth {
        Auth::Bearer(token) => Credentials::Bearer(load(token)?),
        Auth::Basic { user, password } => Credentials::Basic {
            user: user.clone(),
            password: load(password)?,
        },
    })
}

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
    pub fn new(
        urls: &[String],
        credentials: Credentials,
        timeout: Duration,
    ) -> Result<Self, ZduError> {
        let clients = urls
            .iter()
            .map(|u| ZduClient::new(u, credentials.clone(), timeout))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { clients })
    }

    /// A pool over the cluster's `bitbucket_url` then its `bitbucket_node_urls`, with its credentials.
    /// The error names the cluster and says what to fix.
    pub fn for_cluster(cluster: &Cluster, timeout: Duration) -> Result<Self, String> {
        let creds =
            credentials(&cluster.auth).map_err(|e| format!("cluster '{}': {e}", cluster.name))?;
        let urls: Vec<String> = std::iter::once(cluster.bitbucket_url.clone())
            .chain(cluster.bitbucket_node_urls.iter().cloned())
            .collect();
        Self::new(&urls, creds, timeout).map_err(|e| format!("cluster '{}': {e}", cluster.name))
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
