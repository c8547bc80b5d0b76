//! `oci_pull`: a first-party component (`http_check`) fetched by digest from
//! a loopback registry into an empty cache — manifest, layer, signature
//! lookup, digest checks, atomic placement — versus reading the local
//! file and hashing it, which is what loading a `path:` plugin does
//! before compiling; and `oci_warm`, an agent start from the cache (the
//! cache lookup and the whole manifest → layer → file chain check) versus
//! the same local read. Medians of 15 runs; ratio = local / ours (higher
//! is better).

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use cordon_registry::{Publish, fetch, push};
use cordon_runtime::plugin::artifact::{Cached, OciReference};
use cordon_tests::{RegistryServer, guest, median};

const RUNS: usize = 15;

fn local_read(path: &std::path::Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn report(name: &str, value: f64, base: f64) {
    println!("BENCH name={name} value={value:.3} unit=ms baseline={base:.3} ratio={:.3}", base / value);
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let registry = RegistryServer::start();
    let file = guest("http_check");
    let reference = OciReference::parse(&registry.reference("bench/http-check:1")).unwrap();
    let publish = Publish { component: &file, reference: &reference, plain_http: true, sign: None, annotations: Default::default() };
    let source = runtime.block_on(push(publish)).unwrap().source;
    let sha = local_read(&file);
    let dir = tempfile::tempdir().unwrap();

    let (mut cold, mut warm, mut local) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        let root = dir.path().join(format!("cache-{run}"));
        let start = Instant::now();
        runtime.block_on(fetch(&source, &root, true)).unwrap();
        cold.push(start.elapsed());

        let start = Instant::now();
        let cached = runtime.block_on(fetch(&source, &root, true)).unwrap();
        let found = local_read(&cached.component());
        Cached::new(source.cache_dir(&root)).check(&source, &found).unwrap();
        warm.push(start.elapsed());
        assert_eq!(found, sha);

        let start = Instant::now();
        assert_eq!(local_read(&file), sha);
        local.push(start.elapsed());
    }
    let ms = |samples: Vec<Duration>| median(samples).as_secs_f64() * 1e3;
    let (cold, warm, local) = (ms(cold), ms(warm), ms(local));
    let size = std::fs::metadata(&file).unwrap().len();
    println!("oci_pull: {size}-byte component: cold pull {cold:.3} ms, start from the cache {warm:.3} ms, local read {local:.3} ms");
    report("oci_pull", cold, local);
    report("oci_warm", warm, local);
}
