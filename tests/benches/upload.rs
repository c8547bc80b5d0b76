//! `upload`: a 200 MB tree of mixed file sizes uploaded into a paused
//! deployment's source — walk with ignore rules, tar stream, confined
//! extraction into a staging clone, atomic swap — versus `tar -c | tar -x`
//! of the same tree in the same run. Ratio = tar's time / ours (higher is
//! better).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cordon_pipeline::debug::upload::{Limits, Mode, prepare_dir};

/// ~200 MB: many small files, some medium ones, a few large ones.
fn make_tree(root: &Path) -> u64 {
    let mut total = 0u64;
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let write = |path: &Path, size: usize, seed: u64| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let byte = (seed % 251) as u8;
        std::fs::write(path, vec![byte; size]).unwrap();
        size as u64
    };
    for i in 0..8000 {
        total += write(&root.join(format!("assets/{}/small-{i}.txt", i % 40)), 2_000 + (next() % 6_000) as usize, next());
    }
    for i in 0..400 {
        total += write(&root.join(format!("media/{}/medium-{i}.bin", i % 8)), 200_000 + (next() % 200_000) as usize, next());
    }
    for i in 0..4 {
        total += write(&root.join(format!("big/large-{i}.bin")), 8 << 20, next());
    }
    total
}

fn best(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[0]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("local");
    let bytes = make_tree(&source);
    let snapshots = dir.path().join("snapshots");
    std::fs::create_dir_all(&snapshots).unwrap();
    let (mut ours, mut tar) = (Vec::new(), Vec::new());
    for round in 0..3 {
        // Ours: into a workspace that already holds an older copy of the site.
        let workspace = snapshots.join(format!("site-{round}"));
        std::fs::create_dir_all(workspace.join("old")).unwrap();
        std::fs::write(workspace.join("old/index.html"), "v1").unwrap();
        let start = Instant::now();
        let summary = prepare_dir(&source, &[], &workspace, Path::new("."), Mode::Merge, &Limits::default()).unwrap().commit().unwrap();
        ours.push(start.elapsed());
        assert_eq!(summary.bytes, bytes);

        let target = dir.path().join(format!("tar-{round}"));
        std::fs::create_dir_all(&target).unwrap();
        let start = Instant::now();
        let mut create = Command::new("tar").arg("-C").arg(&source).args(["-cf", "-", "."]).stdout(Stdio::piped()).spawn().unwrap();
        let extract = Command::new("tar").arg("-C").arg(&target).args(["-xf", "-"]).stdin(create.stdout.take().unwrap()).status().unwrap();
        assert!(create.wait().unwrap().success() && extract.success());
        tar.push(start.elapsed());
        std::fs::remove_dir_all(&workspace).unwrap();
        std::fs::remove_dir_all(&target).unwrap();
    }
    let (value, base) = (best(ours).as_secs_f64(), best(tar).as_secs_f64());
    println!("upload: {} MB in {} files: ours {value:.3} s, tar -c | tar -x {base:.3} s", bytes / 1_000_000, 8404);
    println!("BENCH name=upload value={value:.3} unit=s baseline={base:.3} ratio={:.3}", base / value);
}
