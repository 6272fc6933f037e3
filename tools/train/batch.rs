//! Batching: the seeded order of each epoch, cut into micro-batches by sequences or by padded
//! tokens, and the fingerprint that ties a checkpoint to its data.

use crate::data::Example;
use crate::Args;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The micro-batches of one epoch: a seeded permutation of the examples, cut by sequences or
/// by padded tokens.
pub fn epoch_plan(examples: &[Example], args: &Args, epoch: u64) -> Vec<Vec<usize>> {
    let mut r = ChaCha8Rng::seed_from_u64(args.seed);
    r.set_stream(epoch);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    for i in (1..order.len()).rev() {
        let j = (r.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut longest = 0;
    for i in order {
        let len = examples[i].ids.len();
        let full = match args.batch_tokens {
            Some(t) => !cur.is_empty() && (cur.len() + 1) * longest.max(len) > t,
            None => cur.len() == args.batch_size,
        };
        if full {
            out.push(std::mem::take(&mut cur));
            longest = 0;
        }
        cur.push(i);
        longest = longest.max(len);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A fingerprint of the training examples, so a resume on other data is refused.
pub fn fingerprint(examples: &[Example]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for e in examples {
        for &id in &e.ids {
            h = (h ^ id as u64).wrapping_mul(0x100000001b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x100000001b3);
    }
    format!("{}:{h:016x}", examples.len())
}
