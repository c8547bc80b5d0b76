//! Filesystem capability: the directories a plugin sees.
//!
//! Every run gets the deployment's sources at fixed guest paths — the target
//! source read-only at [`TARGET`], the running source read-only at
//! [`RUNNING`], a scratch directory read-write at [`SCRATCH`] — plus the
//! operator's granted mounts. Nothing else exists for the guest: there is no
//! `/`, so absolute paths, `..` and symlinks cannot leave these directories
//! (wasmtime-wasi resolves every path with cap-std beneath its preopen).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bytesize::ByteSize;
use serde::Deserialize;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::disk::DiskBudgets;

/// Guest path of the target source.
pub const TARGET: &str = "/source";
/// Guest path of the running (last successful) source.
pub const RUNNING: &str = "/running";
/// Guest path of the per-run scratch directory.
pub const SCRATCH: &str = "/scratch";

const RESERVED: [&str; 3] = [TARGET, RUNNING, SCRATCH];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::ReadOnly => "read-only",
            Access::ReadWrite => "read-write",
        }
    }

    fn perms(self) -> FsPerms {
        match self {
            Access::ReadOnly => FsPerms::ReadOnly,
            Access::ReadWrite => FsPerms::ReadWrite,
        }
    }
}

/// A host directory the operator granted, at a guest path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Mount {
    pub host: PathBuf,
    pub guest: String,
    pub access: Access,
    /// Disk the whole tree may take, for a read-write mount: a call that
    /// passes it fails (see [`super::disk`]). None: no budget.
    #[serde(default)]
    pub quota: Option<ByteSize>,
}

/// Checks granted mounts; relative host paths are resolved against `base`
/// (the directory of the config file that grants them).
pub fn validate(mounts: &mut [Mount], base: &Path) -> Result<(), String> {
    let mut seen: Vec<&str> = Vec::new();
    for mount in mounts.iter_mut() {
        let guest = mount.guest.as_str();
        if !guest.starts_with('/') || guest.split('/').any(|c| c == ".." || c == ".") || guest.len() < 2 {
            return Err(format!("mount guest path {guest:?} must be an absolute path like \"/www\", without `.` or `..`"));
        }
        if let Some(reserved) = RESERVED.iter().find(|r| guest == **r || guest.starts_with(&format!("{r}/"))) {
            return Err(format!("mount guest path {guest:?} overlaps {reserved}, which the host reserves for the deployment's sources; choose another path"));
        }
        if seen.contains(&guest) {
            return Err(format!("two mounts use the guest path {guest:?}; each needs its own"));
        }
        seen.push(guest);
        if mount.quota.is_some() && mount.access == Access::ReadOnly {
            return Err(format!("mount {guest:?} is read-only, so its `quota` means nothing; remove it or grant `access: read-write`"));
        }
        if mount.host.is_relative() {
            mount.host = base.join(&mount.host);
        }
        if !mount.host.is_dir() {
            return Err(format!(
                "mount host path {} is not an existing directory; create it or fix `grants.mounts`",
                mount.host.display()
            ));
        }
    }
    Ok(())
}

/// The per-run directories of one call.
#[derive(Debug, Clone, Default)]
pub struct RunDirs {
    pub target: Option<PathBuf>,
    pub running: Option<PathBuf>,
    pub scratch: Option<PathBuf>,
}

/// The disk budgets of a run: its scratch directory, and every mount with
/// a quota.
pub fn budgets(dirs: &RunDirs, mounts: &[Mount], scratch: ByteSize) -> DiskBudgets {
    let mut budgets = DiskBudgets::default();
    if let Some(host) = &dirs.scratch {
        budgets.add(host, SCRATCH, scratch.as_u64(), false);
    }
    for mount in mounts {
        if let Some(quota) = mount.quota {
            budgets.add(&mount.host, &mount.guest, quota.as_u64(), true);
        }
    }
    budgets
}

/// Preopens the run's directories and the granted mounts.
pub fn preopen(wasi: &mut WasiCtxBuilder, dirs: &RunDirs, mounts: &[Mount]) -> Result<()> {
    let fixed = [(&dirs.target, TARGET, Access::ReadOnly), (&dirs.running, RUNNING, Access::ReadOnly), (&dirs.scratch, SCRATCH, Access::ReadWrite)];
    for (host, guest, access) in fixed {
        if let Some(host) = host {
            wasi.preopened_dir(host, guest, access.perms())
                .map_err(anyhow::Error::from)
                .with_context(|| format!("cannot open {} for {guest}", host.display()))?;
        }
    }
    for mount in mounts {
        wasi.preopened_dir(&mount.host, &mount.guest, mount.access.perms())
            .map_err(anyhow::Error::from)
            .with_context(|| format!("cannot open granted mount {} for {}", mount.host.display(), mount.guest))?;
    }
    Ok(())
}
