//! `scaleout up --tls`: a CA made for the lab, and a certificate per
//! process, so every hop (client → lb → web → db, db ↔ db) runs over TLS,
//! mutual where the receiving side only takes its own tier's callers. Two
//! CAs: one for the site (load balancers, web servers), one for the
//! database nodes, whose Raft ports take only each other.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use scaleout_tls::LocalCa;

use crate::Error;

pub struct LabTls {
    dir: PathBuf,
    /// Issues the site's certificates: the load balancers' (served to
    /// browsers, shown to the web servers) and the web servers'.
    site: LocalCa,
    /// Issues the database nodes' certificates only: the Raft ports take
    /// nothing else, so a web server's or load balancer's key, the most
    /// exposed ones, cannot speak Raft.
    cluster: LocalCa,
    host: IpAddr,
}

/// A process's certificate and key files.
pub struct Files {
    pub cert: String,
    pub key: String,
}

/// Which of the lab's roles a certificate is for: it names only what that
/// role answers as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    LoadBalancer,
    WebServer,
    DbNode,
}

impl LabTls {
    /// Two new CAs in `dir` (`ca.pem` for the site, `cluster-ca.pem` for
    /// the database nodes).
    pub fn new(dir: &Path, host: IpAddr) -> Result<Self, Error> {
        let fail = |e: &dyn std::fmt::Display| Error::Spawn {
            name: "the lab's TLS certificates".into(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        let site = LocalCa::new("scaleout lab site CA").map_err(|e| fail(&e))?;
        let cluster = LocalCa::new("scaleout lab cluster CA").map_err(|e| fail(&e))?;
        std::fs::write(dir.join("ca.pem"), site.cert_pem()).map_err(|e| fail(&e))?;
        std::fs::write(dir.join("cluster-ca.pem"), cluster.cert_pem()).map_err(|e| fail(&e))?;
        Ok(LabTls {
            dir: dir.to_path_buf(),
            site,
            cluster,
            host,
        })
    }

    /// The site's CA: what browsers (and curl) trust.
    pub fn ca(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    /// The database nodes' CA.
    pub fn cluster_ca(&self) -> String {
        self.dir.join("cluster-ca.pem").display().to_string()
    }

    /// `who`'s certificate, for `role`.
    pub fn issue(&self, who: &str, role: Role) -> Result<Files, Error> {
        let fail = |e: &dyn std::fmt::Display| Error::Spawn {
            name: who.into(),
            reason: format!("TLS certificate: {e}"),
        };
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
        if self.host.to_string() != "127.0.0.1" {
            names.push(self.host.to_string());
        }
        if role == Role::LoadBalancer {
            names.push(crate::SITE_NAME.into());
            names.extend(crate::LB_ADDRS.iter().map(|a| a.to_string()));
        }
        let ca = match role {
            Role::DbNode => &self.cluster,
            Role::LoadBalancer | Role::WebServer => &self.site,
        };
        let cert = self.dir.join(format!("{who}.pem"));
        let key = self.dir.join(format!("{who}-key.pem"));
        let issued = ca.issue(&names).map_err(|e| fail(&e))?;
        std::fs::write(&cert, issued.cert_pem).map_err(|e| fail(&e))?;
        write_private(&key, &issued.key_pem).map_err(|e| fail(&e))?;
        Ok(Files {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
        })
    }

    /// A client of the database nodes (the lab itself, waiting for them).
    pub fn db_client(&self) -> Result<reqwest::Client, Error> {
        let config = scaleout_tls::ClientTls {
            ca: Some(self.cluster_ca().into()),
            cert: None,
            key: None,
        }
        .config()
        .map_err(|e| Error::Spawn {
            name: "the lab's TLS client".into(),
            reason: e.to_string(),
        })?;
        reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .timeout(std::time::Duration::from_secs(2))
            .build()
            .map_err(|e| Error::Spawn {
                name: "the lab's TLS client".into(),
                reason: e.to_string(),
            })
    }
}

/// A key file only its owner reads.
pub(crate) fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}
