//! The stable-toolchain fuzz run (CI): every target over its checked-in seed corpus, then a bounded
//! number of deterministic mutations of those seeds (bit flips, interesting bytes, truncation,
//! splicing, duplication, random bytes). No nightly, no libFuzzer, a few seconds in all.
//!
//! `FUZZ_ITERS` (default 2000) sets the mutations per target; `FUZZ_SEED` changes the sequence.
//! A failing input is written to `fuzz/artifacts/<target>/stable-crash-<n>` so that
//! `cargo fuzz run <target> <file>` (or this harness, by adding it to the corpus) replays it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\xff",
    b"\x00",
    b"\r",
    b"\n",
    b"\r\n\r\n",
    b"\n\n",
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"data: ",
    b"event: ",
    b"[DONE]",
    b"\xc3",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"-1",
    b"1e400",
    b"18446744073709551616",
    b"null",
    b"true",
    b"\"usage\":",
    b"\"choices\":[]",
    b"%",
    b"%zz",
    b"=",
    b"\t",
    b"\x7f",
    b"\xed\xa0\x80",
];

fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                if let Some(b) = v.get_mut(i) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = rng.below(v.len() + 1);
                let ins = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(i..i, ins.iter().copied());
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.truncate(i);
            }
            3 if !v.is_empty() => {
                let a = rng.below(v.len());
                let b = (a + rng.below(16) + 1).min(v.len());
                v.drain(a..b);
            }
            4 if !other.is_empty() => {
                let i = rng.below(v.len() + 1);
                let a = rng.below(other.len());
                let b = (a + rng.below(64) + 1).min(other.len());
                v.splice(i..i, other[a..b].iter().copied());
            }
            5 if !v.is_empty() => {
                // duplicate a region (deep nesting, repeated events)
                let a = rng.below(v.len());
                let b = (a + rng.below(32) + 1).min(v.len());
                let region = v[a..b].to_vec();
                for _ in 0..rng.below(8) + 1 {
                    v.splice(a..a, region.iter().copied());
                }
            }
            6 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            _ => {
                let n = rng.below(64);
                v.extend((0..n).map(|_| rng.next() as u8));
            }
        }
    }
    v
}

fn corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

fn run_one(name: &str, f: fn(&[u8]), input: &[u8], n: usize) -> bool {
    let ok = catch_unwind(AssertUnwindSafe(|| f(input))).is_ok();
    if !ok {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("artifacts")
            .join(name);
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("stable-crash-{n}"));
        let _ = std::fs::write(&path, input);
        eprintln!("{name}: input #{n} panicked; saved to {}", path.display());
    }
    ok
}

#[test]
fn seeds_and_mutations() {
    let iters: usize = std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let base: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut failures = Vec::new();
    for (name, f) in llm_gateway_fuzz::TARGETS {
        let seeds = corpus(&root.join(name));
        assert!(!seeds.is_empty(), "no seed corpus for {name}");
        let mut n = 0;
        for s in &seeds {
            n += 1;
            if !run_one(name, *f, s, n) {
                failures.push(format!("{name} seed #{n}"));
            }
        }
        let mut rng = Rng(base ^ (name.len() as u64 * 0x1000_0001) ^ 1);
        for i in 0..iters {
            let seed = &seeds[rng.below(seeds.len())];
            let other = &seeds[rng.below(seeds.len())];
            let input = if i % 50 == 49 {
                (0..rng.below(512)).map(|_| rng.next() as u8).collect()
            } else {
                mutate(&mut rng, seed, other)
            };
            n += 1;
            if !run_one(name, *f, &input, n) {
                failures.push(format!("{name} mutation #{n}"));
            }
        }
    }
    assert!(failures.is_empty(), "panics: {failures:?}");
}
