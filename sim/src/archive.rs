//! Release archives laid out like Atlassian's `atlassian-bitbucket-X.Y.Z.tar.gz`, carrying the
//! simulator itself as the "JVM" so an extracted install runs on its own.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use flate2::Compression;
use flate2::write::GzEncoder;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use crate::scripts::BIN_SCRIPTS;
use crate::version::Version;

/// Largest single payload jar, so a big payload is several files as in a real `WEB-INF/lib`.
const PAYLOAD_JAR_MAX_MIB: u64 = 64;
const MIB: u64 = 1024 * 1024;

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveInfo {
    pub path: PathBuf,
    /// Lowercase hex SHA-256 of the whole `.tar.gz` file.
    pub sha256: String,
    pub size_bytes: u64,
}

/// `atlassian-bitbucket-X.Y.Z.tar.gz`
pub fn archive_file_name(version: &str) -> String {
    format!("atlassian-bitbucket-{version}.tar.gz")
}

/// Writes a release archive whose node program is the running executable.
pub fn write_archive(version: &str, out: &Path, payload_mib: u64) -> anyhow::Result<ArchiveInfo> {
    let program = std::env::current_exe().context("finding the bitbucket-sim program to bundle")?;
    write_archive_with_program(version, out, payload_mib, &program)
}

/// Writes a release archive bundling `program` (the `bitbucket-sim` binary) as `jre/bin/bitbucket-sim`.
/// `out` is the file to write, or a directory to write `archive_file_name(version)` into.
pub fn write_archive_with_program(
    version: &str,
    out: &Path,
    payload_mib: u64,
    program: &Path,
) -> anyhow::Result<ArchiveInfo> {
    let parsed: Version = version.parse()?;
    let path = if out.is_dir() {
        out.join(archive_file_name(version))
    } else {
        out.to_path_buf()
    };
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let hashing = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        written: 0,
    };
    // Level 1: the payload is incompressible like real jars, and speed is what matters here.
    let gz = GzEncoder::new(hashing, Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    let top = format!("atlassian-bitbucket-{version}");

    for dir in [
        "",
        "bin",
        "app",
        "app/WEB-INF",
        "app/WEB-INF/classes",
        "app/WEB-INF/lib",
        "conf",
        "lib",
        "lib/native",
        "opensearch",
        "opensearch/bin",
        "jre",
        "jre/bin",
    ] {
        let name = if dir.is_empty() {
            format!("{top}/")
        } else {
            format!("{top}/{dir}/")
        };
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        tar.append_data(&mut header, name, io::empty())?;
    }
    for (name, content) in BIN_SCRIPTS {
        append_bytes(
            &mut tar,
            &format!("{top}/bin/{name}"),
            content.as_bytes(),
            0o755,
        )?;
    }
    let build = format!(
        "build.version={parsed}\nbuild.number={}\nbuild.date=2024-01-01T00:00:00.000Z\n",
        parsed.build_number()
    );
    append_bytes(
        &mut tar,
        &format!("{top}/app/WEB-INF/classes/build.properties"),
        build.as_bytes(),
        0o644,
    )?;
    let readme = format!(
        "Atlassian Bitbucket {parsed} (simulated by bitbucket-sim)\n\nStart with bin/start-bitbucket.sh, stop with bin/stop-bitbucket.sh.\nSet BITBUCKET_HOME in bin/set-bitbucket-home.sh.\n"
    );
    append_bytes(
        &mut tar,
        &format!("{top}/README.txt"),
        readme.as_bytes(),
        0o644,
    )?;
    let server_xml = "<!-- bitbucket-sim: the HTTP port is set with -Dserver.port -->\n<Server/>\n";
    append_bytes(
        &mut tar,
        &format!("{top}/conf/server.xml"),
        server_xml.as_bytes(),
        0o644,
    )?;
    append_bytes(
        &mut tar,
        &format!("{top}/lib/native/README.txt"),
        b"Native libraries.\n",
        0o644,
    )?;
    append_bytes(
        &mut tar,
        &format!("{top}/opensearch/bin/README.txt"),
        b"Bundled search (simulated by bitbucket-sim search).\n",
        0o644,
    )?;

    let mut prog = File::open(program)
        .with_context(|| format!("opening the node program {}", program.display()))?;
    let prog_len = prog.metadata()?.len();
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o755);
    header.set_size(prog_len);
    tar.append_data(
        &mut header,
        format!("{top}/jre/bin/bitbucket-sim"),
        &mut prog,
    )
    .with_context(|| format!("adding {} to the archive", program.display()))?;

    let mut rng = rand::rngs::SmallRng::seed_from_u64(parsed.build_number());
    let mut left = payload_mib * MIB;
    let mut index = 1;
    while left > 0 {
        let len = left.min(PAYLOAD_JAR_MAX_MIB * MIB);
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(len);
        let payload = RandomBytes {
            rng: &mut rng,
            left: len,
        };
        tar.append_data(
            &mut header,
            format!("{top}/app/WEB-INF/lib/bitbucket-payload-{index:03}.jar"),
            payload,
        )?;
        left -= len;
        index += 1;
    }

    let gz = tar.into_inner().context("finishing the tar stream")?;
    let mut hashing = gz.finish().context("finishing the gzip stream")?;
    hashing.inner.flush()?;
    hashing.inner.get_ref().sync_all().ok();
    Ok(ArchiveInfo {
        path,
        sha256: hex::encode(hashing.hasher.finalize()),
        size_bytes: hashing.written,
    })
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    data: &[u8],
    mode: u32,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_mode(mode);
    header.set_size(data.len() as u64);
    tar.append_data(&mut header, path, data)
}

/// Extracts an archive into `dest` (giving `dest/atlassian-bitbucket-X.Y.Z`), keeping modes.
pub fn extract(archive: &Path, dest: &Path) -> anyhow::Result<()> {
    let file = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    tar.set_preserve_permissions(true);
    std::fs::create_dir_all(dest)?;
    tar.unpack(dest)
        .with_context(|| format!("extracting {} into {}", archive.display(), dest.display()))
}

/// Writes through to `inner`, hashing and counting what passes.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `left` bytes of fast pseudo-random (incompressible) data.
struct RandomBytes<'a> {
    rng: &'a mut rand::rngs::SmallRng,
    left: u64,
}

impl Read for RandomBytes<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        self.rng.fill_bytes(&mut buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_checksum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = dir.path().join("prog");
        std::fs::write(&program, b"#!/bin/sh\n").expect("program");
        let info = write_archive_with_program("8.19.3", dir.path(), 1, &program).expect("archive");
        assert_eq!(
            info.path,
            dir.path().join("atlassian-bitbucket-8.19.3.tar.gz")
        );
        let bytes = std::fs::read(&info.path).expect("read");
        assert_eq!(info.size_bytes, bytes.len() as u64);
        assert_eq!(info.sha256, hex::encode(Sha256::digest(&bytes)));
        assert!(info.size_bytes > MIB, "payload must stay incompressible");

        let dest = dir.path().join("x");
        extract(&info.path, &dest).expect("extract");
        let top = dest.join("atlassian-bitbucket-8.19.3");
        for (name, _) in BIN_SCRIPTS {
            assert!(top.join("bin").join(name).is_file(), "{name}");
        }
        let build = std::fs::read_to_string(top.join("app/WEB-INF/classes/build.properties"))
            .expect("build");
        assert!(build.contains("build.version=8.19.3"));
        for p in [
            "conf",
            "lib/native",
            "opensearch",
            "README.txt",
            "jre/bin/bitbucket-sim",
            "app/WEB-INF/lib/bitbucket-payload-001.jar",
        ] {
            assert!(top.join(p).exists(), "{p}");
        }
        assert!(write_archive_with_program("8.19", dir.path(), 0, &program).is_err());
    }
}
