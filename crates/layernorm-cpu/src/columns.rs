//! The backward of very long rows in column chunks (when: [`by_columns`]).
//!
//! The row-wise kernels keep a row in cache between its two sweeps and add every row's dγ/dβ
//! terms into its block's partial vectors, 2·N values read and written once per row. At a million
//! elements neither holds: a row of x and dy is 8 MiB, and the partials' read-modify-write moves
//! more bytes than the row itself (4×1048576 on the AMD Zen 3 VM: 4.9 GB/s with dγ/dβ, 13.7
//! without). Here:
//!
//! 1. every row's constants, one streaming sweep per row (rows in parallel);
//! 2. the columns in chunks of [`CHUNK`]: for each chunk, each block's rows in row order write
//!    their dx and add their dγ/dβ terms into chunk-sized partials that stay in L1, which are
//!    summed into `f64` block by block — the driver's reduction — and rounded once.
//!
//! Per element these are the operations of the row-wise path in the same order (the row sums of
//! `backward_sums`, `back_params`, the apply step, partials per 32-row block from zero, blocks
//! summed in `f64` in block order), so the bits are the same (tested), and they do not depend on
//! how chunks are spread over threads. x and dy are read twice, but nothing else leaves the
//! cache, and the chunks spread over threads even when there are fewer rows than a block.

use rayon::prelude::*;

use layernorm_core::Result;

use crate::driver::{is_parallel, try_with_capacity};
use crate::reduce::ColumnScratch;
use crate::row::{self, BackParams, Kind};

/// Rows at least this long take the column-chunked backward (`f32`) whatever the pool: measured
/// on the AMD Zen 3 VM against the row-wise path at one thread, 4×1048576 5.7 → 7.5 GB/s and
/// 2×4194304 0.8 → 5.2, while at 64K–256K the row-wise path stayed ahead (its rows stay in
/// cache between their sweeps; here x and dy are read twice).
pub(crate) const COLUMN_MIN_N: usize = 1 << 20;

/// From this length on, the column-chunked backward also runs when the row-wise path would
/// leave threads idle (fewer 32-row blocks than threads): at two threads 16×262144 11.3 → 16.9
/// GB/s, 32×131072 12.5 → 18.0, 4×1048576 5.5 → 13.1. The two paths give the same bits, so the
/// choice does not touch determinism (tested across pools).
pub(crate) const COLUMN_SPREAD_MIN_N: usize = 1 << 17;

/// Whether a backward of `rows` rows of `n` goes by column chunks (on the current pool).
pub(crate) fn by_columns(rows: usize, n: usize) -> bool {
    let blocks = rows.div_ceil(crate::driver::ROW_BLOCK);
    n >= COLUMN_MIN_N
        || (n >= COLUMN_SPREAD_MIN_N
            && is_parallel(rows * n)
            && blocks < rayon::current_num_threads())
}

/// Columns per chunk: the chunk's dγ and dβ partials (8 KiB each) and its `f64` sums stay in
/// L1/L2 while the block's rows stream through.
pub(crate) const CHUNK: usize = 2048;

/// Backward of `mean.len()` rows of `n` (see the module docs); `dgamma`/`dbeta` receive the
/// finished gradients.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    kind: Kind,
    n: usize,
    x: &[f32],
    dy: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: Option<&[f32]>,
    dx: &mut [f32],
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
) -> Result<()> {
    let rows = mean.len().min(rstd.len());
    if rows == 0 || n == 0 {
        for d in [dgamma, dbeta].into_iter().flatten() {
            d.fill(0.0);
        }
        return Ok(());
    }
    let par = is_parallel(rows * n);
    let params_of = |r: usize| -> BackParams<f32> {
        let span = r * n..(r + 1) * n;
        let (m, s) = row::back_shift_f32(mean[r], rstd[r]);
        let sums = crate::reduce::backward_sums(&x[span.clone()], &dy[span], gamma, m, s);
        row::back_params::<f32>(kind, n, f64::from(mean[r]), f64::from(rstd[r]), sums)
    };
    let mut params: Vec<BackParams<f32>> = try_with_capacity("row constants", rows)?;
    if par {
        (0..rows).into_par_iter().map(params_of).collect_into_vec(&mut params);
    } else {
        params.extend((0..rows).map(params_of));
    }

    // Each chunk's piece of every row of dx, and of dγ and dβ.
    let chunks = n.div_ceil(CHUNK);
    let mut dxs: Vec<Vec<&mut [f32]>> = try_with_capacity("column chunks", chunks)?;
    for _ in 0..chunks {
        dxs.push(try_with_capacity("column chunks", rows)?);
    }
    for row in dx.chunks_mut(n).take(rows) {
        for (c, piece) in row.chunks_mut(CHUNK).enumerate() {
            dxs[c].push(piece);
        }
    }
    let (dgs, dbs) = (pieces(dgamma, chunks)?, pieces(dbeta, chunks)?);
    let work = |scratch: &mut ColumnScratch, (c, ((dx, dg), db)): (usize, ((Vec<_>, _), _))| {
        let cols = c * CHUNK..((c + 1) * CHUNK).min(n);
        let rows = (x, dy, gamma);
        crate::reduce::back_column_chunk(scratch, n, cols, rows, &params, dx, (dg, db));
    };
    // Each worker keeps its chunk buffers from chunk to chunk.
    let tasks = dxs.into_iter().zip(dgs).zip(dbs).enumerate();
    if par {
        let mut all = try_with_capacity("column chunks", chunks)?;
        all.extend(tasks);
        all.into_par_iter().for_each_init(ColumnScratch::default, work);
    } else {
        let mut scratch = ColumnScratch::default();
        tasks.for_each(|t| work(&mut scratch, t));
    }
    Ok(())
}

/// `d` in pieces of [`CHUNK`] (or `chunks` times `None`).
fn pieces(d: Option<&mut [f32]>, chunks: usize) -> Result<Vec<Option<&mut [f32]>>> {
    let mut v = try_with_capacity("column chunks", chunks)?;
    match d {
        Some(d) => v.extend(d.chunks_mut(CHUNK).map(Some)),
        None => v.extend((0..chunks).map(|_| None)),
    }
    Ok(v)
}

#[cfg(feature = "unit-tests")]
#[doc(hidden)]
pub mod tests {
    use super::*;
    use crate::driver::Out;
    use crate::reduce::tests::mixed_rows;

    /// Bitwise equal, NaN where `want` is NaN (a NaN's sign follows the operand order the
    /// compiler picks for a commutative operation; every other value is compared bit for bit).
    fn same(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let ok = if w.is_nan() { g.is_nan() } else { g.to_bits() == w.to_bits() };
            assert!(ok, "{what}[{i}]: got {g:e}, want {w:e}");
        }
    }

    pub fn column_chunks_match_the_row_wise_backward_bit_for_bit() {
        // Ragged chunks and ragged blocks; rows taking every path of the statistics
        // (`mixed_rows`: constant rows, large offsets, huge values, a NaN).
        let shapes = [(1, 300), (3, CHUNK + 37), (33, 2 * CHUNK), (70, CHUNK - 5)];
        let specs = crate::reduce::tests::SPECS;
        for ((rows, n), (spec, _)) in
            shapes.into_iter().flat_map(|s| specs[..2].iter().map(move |p| (s, *p)))
        {
            let kind = spec.kind;
            let x = mixed_rows(rows, n);
            let dy: Vec<f32> =
                (0..rows * n).map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0).collect();
            let g: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 / n as f32).collect();
            let b = vec![0.25f32; n];
            let (mut y, mut mean, mut rstd) =
                (vec![0f32; rows * n], vec![0f32; rows], vec![0f32; rows]);
            let (gg, bb) = (Some(&g[..]), Some(&b[..]));
            let m = kind.centred().then_some(&mut mean[..]);
            let out = Out::Cached;
            crate::driver::forward(n, (spec, 0.0), &x, None, gg, bb, &mut y, m, &mut rstd, out)
                .unwrap();
            for gamma in [Some(&g[..]), None] {
                for want in [(true, true), (true, false), (false, true), (false, false)] {
                    let what =
                        format!("{rows}x{n}, gamma {}, want {want:?}, {kind:?}", gamma.is_some());
                    let (mut dx0, mut dg0, mut db0) =
                        (vec![0f32; rows * n], vec![9f32; n], vec![9f32; n]);
                    let (dg, db) = (want.0.then_some(&mut dg0[..]), want.1.then_some(&mut db0[..]));
                    let m = kind.centred().then_some(&mean[..]);
                    let (k, xs) = ((kind, 0.0), (&x[..], &dy[..]));
                    let saved = crate::driver::Saved::X(xs.0);
                    crate::driver::backward(
                        n, k, saved, xs.1, None, m, &rstd, gamma, &mut dx0, dg, db, false,
                    )
                    .unwrap();
                    let (mut dx1, mut dg1, mut db1) =
                        (vec![0f32; rows * n], vec![9f32; n], vec![9f32; n]);
                    let (dg, db) = (want.0.then_some(&mut dg1[..]), want.1.then_some(&mut db1[..]));
                    backward(kind, n, &x, &dy, &mean, &rstd, gamma, &mut dx1, dg, db).unwrap();
                    same(&format!("dx {what}"), &dx1, &dx0);
                    same(&format!("dgamma {what}"), &dg1, &dg0);
                    same(&format!("dbeta {what}"), &db1, &db0);
                }
            }
        }
    }
}
