//! The capture registry: which pods the node-agent captures, read from a YAML file (Kubernetes
//! later). A registry that does not parse is an error and the last good one stays in force.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    #[serde(default)]
    pub pods: Vec<PodSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    /// Unique; names the pin directory `<bpffs>/eastguard/<name>`.
    pub name: String,
    /// The pod's cgroup (v2): app and sidecar containers are below it.
    pub cgroup: PathBuf,
    /// The sidecar container's cgroup: its sockets are never redirected.
    pub sidecar_cgroup: PathBuf,
    /// The pod's network namespace (`/run/netns/<name>` or `/proc/<pid>/ns/net`).
    pub netns: PathBuf,
    #[serde(default = "default_outbound")]
    pub outbound_port: u16,
    #[serde(default = "default_inbound")]
    pub inbound_port: u16,
    /// Destination ports app connects reach directly (Istio's excludeOutboundPorts).
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination CIDRs app connects reach directly (excludeOutboundIPRanges).
    #[serde(default)]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Local ports not steered to the sidecar (excludeInboundPorts); Istio's health and
    /// metrics ports by default.
    #[serde(default = "default_exclude_inbound")]
    pub exclude_inbound_ports: Vec<u16>,
    /// Same-node app<->sidecar socket short-circuit (sockops + sk_msg).
    #[serde(default = "yes")]
    pub short_circuit: bool,
    /// Written with the capture state (`attached`, or `not-ready: why`) for the sidecar's
    /// readiness; removed when the pod goes away.
    #[serde(default)]
    pub status_file: Option<PathBuf>,
}

fn default_outbound() -> u16 {
    15001
}
fn default_inbound() -> u16 {
    15006
}
fn default_exclude_inbound() -> Vec<u16> {
    vec![15020, 15021, 15090]
}
fn yes() -> bool {
    true
}

/// A CIDR as the programs key it: 16 bytes (IPv4 mapped into ::ffff:0:0/96) and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub ip: [u8; 16],
    pub prefix_len: u32,
}

/// A CIDR that does not parse, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?}: {reason}")]
pub struct BadCidr {
    pub text: String,
    pub reason: String,
}

/// Why a capture registry was refused; the registry in force stays.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    File {
        path: String,
        source: Box<RegistryError>,
    },
    #[error("the registry is empty (write `pods: []` to remove every pod)")]
    Empty,
    #[error(transparent)]
    Yaml(#[from] serde_yaml::Error),
    #[error("{at}: {reason}")]
    Pod { at: String, reason: String },
}

/// Back to text: an IPv4-mapped address with a prefix of at least 96 as IPv4.
impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v6 = std::net::Ipv6Addr::from(self.ip);
        match v6.to_ipv4_mapped() {
            Some(v4) if self.prefix_len >= 96 => write!(f, "{v4}/{}", self.prefix_len - 96),
            _ => write!(f, "{v6}/{}", self.prefix_len),
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Self, BadCidr> {
        let bad = |reason: String| BadCidr {
            text: s.to_owned(),
            reason,
        };
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/PREFIX".into()))?;
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| bad(format!("{addr:?} is not an IP address")))?;
        let len: u32 = len
            .parse()
            .map_err(|_| bad(format!("{len:?} is not a prefix length")))?;
        let (ip, max, offset) = match ip {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 32, 96),
            IpAddr::V6(v6) => (v6.octets(), 128, 0),
        };
        if len > max {
            return Err(bad(format!("prefix length above {max}")));
        }
        Ok(Cidr {
            ip,
            prefix_len: len + offset,
        })
    }
}

impl Registry {
    /// An empty file is refused: it is what a truncated write looks like, and taking it as "no
    /// pods" would detach every pod's capture (guard included) at once. `pods: []` says it.
    pub fn parse(text: &str) -> Result<Registry, RegistryError> {
        if text.trim().is_empty() {
            return Err(RegistryError::Empty);
        }
        let reg: Registry = serde_yaml::from_str(text)?;
        reg.validate()?;
        Ok(reg)
    }

    pub fn load(path: &Path) -> Result<Registry, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Registry::parse(&text).map_err(|e| RegistryError::File {
            path: path.display().to_string(),
            source: Box::new(e),
        })
    }

    /// The checks `parse` makes (for registries built in code: from Kubernetes' pod list).
    pub fn validate(&self) -> Result<(), RegistryError> {
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.pods.iter().enumerate() {
            let at = format!("pods[{i}] ({})", p.name);
            let invalid = |reason: &str| RegistryError::Pod {
                at: at.clone(),
                reason: reason.to_owned(),
            };
            let name_ok = !p.name.is_empty()
                && p.name.len() <= 200
                && p.name != "."
                && p.name != ".."
                && p.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            if !name_ok {
                return Err(invalid(
                    "name must be 1-200 of [A-Za-z0-9._-] and not . or ..",
                ));
            }
            if !seen.insert(p.name.as_str()) {
                return Err(invalid("name repeats an earlier pod"));
            }
            for (field, port) in [
                ("outbound_port", p.outbound_port),
                ("inbound_port", p.inbound_port),
            ] {
                if port == 0 {
                    return Err(invalid(&format!("{field} must not be 0")));
                }
            }
            if p.outbound_port == p.inbound_port {
                return Err(invalid("outbound_port and inbound_port must differ"));
            }
            if !p.sidecar_cgroup.starts_with(&p.cgroup) || p.sidecar_cgroup == p.cgroup {
                return Err(invalid(
                    "sidecar_cgroup must be below cgroup (the sidecar is a container of the pod)",
                ));
            }
            if p.exclude_outbound_ports.len() > 64 || p.exclude_inbound_ports.len() > 61 {
                return Err(invalid("at most 64 excluded ports each way"));
            }
            if p.exclude_outbound_cidrs.len() > 64 {
                return Err(invalid("at most 64 excluded CIDRs"));
            }
            for c in &p.exclude_outbound_cidrs {
                c.parse::<Cidr>()
                    .map_err(|e| invalid(&format!("exclude_outbound_cidrs: {e}")))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_read_back_as_written() {
        for text in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "192.168.1.7/32",
            "fd00::/8",
            "::/0",
            "::ffff:0:0/96",
        ] {
            let c: Cidr = text.parse().unwrap();
            let back = c.to_string();
            assert_eq!(back.parse::<Cidr>().unwrap(), c, "{text} -> {back}");
        }
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
    }

    fn pod(extra: &str) -> String {
        format!(
            "pods:\n- name: a\n  cgroup: /cg/a\n  sidecar_cgroup: /cg/a/sidecar\n  netns: /run/netns/a\n{extra}"
        )
    }

    #[test]
    fn defaults_follow_istio() {
        let r = Registry::parse(&pod("")).unwrap();
        let p = &r.pods[0];
        assert_eq!((p.outbound_port, p.inbound_port), (15001, 15006));
        assert_eq!(p.exclude_inbound_ports, vec![15020, 15021, 15090]);
        assert!(p.short_circuit);
        assert!(Registry::parse("pods: []").unwrap().pods.is_empty());
        for empty in ["", "\n", "  \n\n"] {
            let e = Registry::parse(empty).unwrap_err();
            assert!(matches!(e, RegistryError::Empty), "{e}");
            assert!(e.to_string().contains("pods: []"), "{e}");
        }
    }

    #[test]
    fn bad_entries_are_named() {
        for (extra, want) in [
            ("  exclude_outbound_cidrs: [10.0.0.0/33]\n", "prefix length"),
            ("  exclude_outbound_cidrs: [bogus]\n", "ADDRESS/PREFIX"),
            ("  inbound_port: 15001\n", "must differ"),
            ("  outbound_port: 0\n", "must not be 0"),
            ("  colour: red\n", "unknown field"),
        ] {
            let e = Registry::parse(&pod(extra)).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let e = Registry::parse(
            "pods:\n- name: ../x\n  cgroup: /a\n  sidecar_cgroup: /a/s\n  netns: /n\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("name must be"), "{e}");
        let e =
            Registry::parse("pods:\n- name: x\n  cgroup: /a\n  sidecar_cgroup: /b\n  netns: /n\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("below cgroup"), "{e}");
        let twice = format!("{}{}", pod(""), &pod("")["pods:\n".len()..]);
        assert!(
            Registry::parse(&twice)
                .unwrap_err()
                .to_string()
                .contains("repeats")
        );
    }

    #[test]
    fn cidrs_key_ipv4_as_mapped() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert_eq!(c.prefix_len, 112);
        assert_eq!(&c.ip[10..14], &[0xff, 0xff, 10, 1]);
        let c: Cidr = "fd00::/8".parse().unwrap();
        assert_eq!((c.prefix_len, c.ip[0]), (8, 0xfd));
    }
}
