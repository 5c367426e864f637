//! Fitting a step in device memory. A step's micro-batches (of at most `micro_batch_tokens`
//! padded tokens) are what its loss groups by (BNPO divides by each one's tokens). When one runs
//! out of device memory, the step's gradient so far is dropped and the step runs again with each
//! micro-batch in pieces, whose gradients add up to the micro-batch's own: the piece that failed
//! is halved, down to one sequence (or pair) a piece, and then per-layer checkpointing is turned
//! on. What fitted holds for the steps after it (it lives in the optimizer, which every step of
//! a run shares, and goes into its checkpoints with it: a resumed run does not run out of memory
//! again to learn it), and a single sequence that does not fit even so is an error that says so.
//!
//! A shortage may pass: on one GPU the rollout workers' batches come and go beside the learner.
//! So after [`PROBE_EVERY`] steps under a reduced fit, a step tries the next larger one (pieces
//! twice as large, then whole micro-batches, then without the checkpointing); if that step runs
//! out of memory it runs again under the fit it had, and the next try waits twice as long
//! ([`model::error::Regrow`], which the rollout workers' batches follow too).

use std::cell::{Cell, RefCell};
use std::ops::Range;

use crate::error::{LearnerError, Result};
use crate::optim::AdamW;

/// How much of a micro-batch the device has room for, learnt from running out of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fit {
    /// The most padded tokens a piece holds (None: micro-batches run whole).
    pub piece_tokens: Option<usize>,
    /// Per-layer checkpointing, turned on once a single sequence ran out of memory without it.
    pub checkpointed: bool,
}

impl Fit {
    /// The next larger fit, for micro-batches of at most `budget` padded tokens: pieces twice
    /// as large (whole micro-batches once they would hold one), then no checkpointing; None
    /// for whole micro-batches without it.
    fn larger(self, budget: usize) -> Option<Fit> {
        match self.piece_tokens {
            Some(t) if 2 * t < budget => Some(Fit {
                piece_tokens: Some(2 * t),
                ..self
            }),
            Some(_) => Some(Fit {
                piece_tokens: None,
                ..self
            }),
            None if self.checkpointed => Some(Fit::default()),
            None => None,
        }
    }
}

/// Steps run under a reduced fit before one tries the next larger fit (doubled after each try
/// that runs out of memory).
pub const PROBE_EVERY: usize = 32;

/// A piece of a step that runs as one forward and backward: a micro-batch, or part of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The step's items it holds.
    pub range: Range<usize>,
    /// The micro-batch it is part of, when it is not the whole of it.
    pub part_of: Option<Range<usize>>,
}

/// A step's micro-batches in the pieces that [`fitted`] runs them in.
pub struct Plan {
    pieces: Vec<Piece>,
    micro_batches: usize,
    /// Runs the step made before this one (0: it fitted at once).
    pub retries: usize,
    /// The piece handed out last: the one running when an attempt fails.
    running: RefCell<Option<Range<usize>>>,
}

impl Plan {
    /// The pieces in order, each to run as it is handed out.
    pub fn pieces(&self) -> impl Iterator<Item = &Piece> {
        self.pieces.iter().inspect(|p| {
            self.running.replace(Some(p.range.clone()));
        })
    }

    /// The step's micro-batches (its loss's groups), however many pieces they run in.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }
}

/// The padded tokens of `range`'s items, each `rows` rows of `lengths[i]` tokens, padded to the
/// longest.
pub fn padded_tokens(lengths: &[usize], rows: usize, range: Range<usize>) -> usize {
    let longest = lengths[range.clone()].iter().copied().max().unwrap_or(0);
    rows * range.len() * longest
}

/// Splits `range` of items into consecutive batches of at most `budget` padded tokens
/// ([`padded_tokens`]); an item over the budget is a batch of its own.
pub fn by_tokens(
    lengths: &[usize],
    rows: usize,
    range: Range<usize>,
    budget: usize,
) -> Vec<Range<usize>> {
    by_cost(&|r| padded_tokens(lengths, rows, r), range, budget)
}

/// Splits `range` of items into consecutive batches of at most `budget` tokens as `tokens`
/// counts a batch (which must not fall as a batch grows); an item over the budget is a batch of
/// its own.
pub fn by_cost(
    tokens: &dyn Fn(Range<usize>) -> usize,
    range: Range<usize>,
    budget: usize,
) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = range.start;
    for i in range.clone() {
        if i > start && tokens(start..i + 1) > budget {
            out.push(start..i);
            start = i;
        }
    }
    if start < range.end {
        out.push(start..range.end);
    }
    out
}

/// Runs a step through `attempt` until it fits in device memory. The step's `n` items run in
/// micro-batches of `budget` tokens as `tokens` counts a range of them (padded rows, or packed:
/// what the device holds); `attempt` runs
/// each micro-batch's pieces, accumulating their gradients in `opt`, under
/// [`model::checkpoint::forced`] once [`Fit::checkpointed`]. It is called again, on a smaller
/// plan, while it fails for want of device memory ([`LearnerError::is_out_of_memory`]); the
/// gradient it had accumulated is dropped first. With f16 parameters it is also called again,
/// on the same plan, while the scaled gradient overflows ([`AdamW::overflowed`]): the loss scale
/// halves each time.
pub fn fitted<T>(
    opt: &mut AdamW,
    n: usize,
    tokens: &dyn Fn(Range<usize>) -> usize,
    budget: usize,
    mut attempt: impl FnMut(&mut AdamW, &Plan) -> Result<T>,
) -> Result<T> {
    let micro = by_cost(tokens, 0..n, budget);
    let mut retries = 0;
    opt.fitting.grow(|fit| fit.larger(budget));
    loop {
        let fit = opt.fitting.size();
        let pieces = micro.iter().flat_map(|m| {
            let parts = match fit.piece_tokens {
                Some(b) => by_cost(tokens, m.clone(), b),
                None => vec![m.clone()],
            };
            let whole = parts.len() == 1;
            parts.into_iter().map(move |range| Piece {
                range,
                part_of: (!whole).then(|| m.clone()),
            })
        });
        let plan = Plan {
            pieces: pieces.collect(),
            micro_batches: micro.len(),
            retries,
            running: RefCell::new(None),
        };
        let error = match model::checkpoint::forced(fit.checkpointed, || attempt(opt, &plan)) {
            Err(e) if e.is_out_of_memory() => e,
            // an f16 gradient that overflowed: the same plan again, at half the loss scale
            Ok(_) if opt.overflowed()? => continue,
            done => {
                if done.is_ok() {
                    opt.fitting.fitted();
                }
                return done;
            }
        };
        opt.zero_grad();
        retries += 1;
        // a larger fit tried and too large: back to the one that fitted, tried again later
        if opt.fitting.ran_out() {
            continue;
        }
        // the piece that failed (the largest, if it failed before any)
        let failed = plan.running.take().unwrap_or_else(|| {
            let largest = plan
                .pieces
                .iter()
                .map(|p| &p.range)
                .max_by_key(|r| tokens((*r).clone()));
            largest.expect("a step has an item").clone()
        });
        let smaller = if failed.len() > 1 {
            Fit {
                piece_tokens: Some(tokens(failed.clone()) / 2),
                ..fit
            }
        } else if !fit.checkpointed {
            Fit {
                piece_tokens: None,
                checkpointed: true,
            }
        } else {
            return Err(LearnerError::OutOfMemory(format!(
                "a single sequence of {} tokens does not fit in device memory, even alone \
                 and with per-layer checkpointing ({error}); shorten the longest prompts or \
                 completions, or use a device with more memory",
                tokens(failed.clone())
            )));
        };
        opt.fitting.set(smaller);
    }
}

/// `f` of `range`'s items, or, where it fails for want of device memory, of its two halves in
/// turn (recursively, down to single items), concatenated: for passes without a gradient, which
/// hold nothing between pieces that a failure would have to drop.
pub fn halving<T>(
    range: Range<usize>,
    f: &mut impl FnMut(Range<usize>) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    match f(range.clone()) {
        Err(e) if e.is_out_of_memory() && range.len() > 1 => {
            let mid = range.start + range.len() / 2;
            let mut out = halving(range.start..mid, f)?;
            out.extend(halving(mid..range.end, f)?);
            Ok(out)
        }
        done => done,
    }
}

thread_local! {
    /// The padded tokens a piece may hold before [`room_for`] fails it ([`with_room`]).
    static ROOM: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `f` as if the device had room for pieces of at most `tokens` padded tokens on this
/// thread: a larger one fails as out of memory when it is packed, after the pieces before it
/// have run. Tests reach [`fitted`]'s retries with it on the CPU, whose allocations cannot fail.
pub fn with_room<T>(tokens: usize, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            ROOM.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(ROOM.with(|r| r.replace(Some(tokens))));
    f()
}

/// Fails as out of memory when a piece of `tokens` padded tokens exceeds [`with_room`]'s room.
pub(crate) fn room_for(tokens: usize) -> Result<()> {
    match ROOM.with(Cell::get) {
        Some(room) if tokens > room => Err(LearnerError::OutOfMemory(format!(
            "{tokens} padded tokens where there is room for {room} (simulated)"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_splits_what_does_not_fit_and_keeps_the_order() {
        // room for 2 items: 0..5 → 0..2, 2..5 → 2..3, 3..5
        let mut runs = Vec::new();
        let mut f = |r: Range<usize>| {
            runs.push(r.clone());
            room_for(r.len())?;
            Ok(r.collect::<Vec<_>>())
        };
        let got = with_room(2, || halving(0..5, &mut f)).unwrap();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert_eq!(runs, vec![0..5, 0..2, 2..5, 2..3, 3..5]);
        // an item that fits nowhere, or another error, is the error
        assert!(with_room(0, || halving(0..3, &mut |r| {
            room_for(r.len())?;
            Ok(vec![r.start])
        }))
        .unwrap_err()
        .is_out_of_memory());
        let e = halving(0..3, &mut |_| -> Result<Vec<u8>> {
            Err(LearnerError::Invalid("bad".into()))
        });
        assert!(matches!(e, Err(LearnerError::Invalid(_))));
    }

    #[test]
    fn batches_hold_their_budget_and_a_long_item_stands_alone() {
        let lengths = [3, 5, 2, 9, 4, 4];
        // rows × items × longest: [3, 5] = 10, then [2] + 9 would be 18
        assert_eq!(
            by_tokens(&lengths, 1, 0..6, 10),
            vec![0..2, 2..3, 3..4, 4..6]
        );
        assert_eq!(
            by_tokens(&lengths, 2, 0..6, 10),
            vec![0..1, 1..2, 2..3, 3..4, 4..5, 5..6]
        );
        assert_eq!(by_tokens(&lengths, 1, 2..5, 100), vec![2..5]);
        assert_eq!(padded_tokens(&lengths, 2, 3..6), 2 * 3 * 9);
    }
}
