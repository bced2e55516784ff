//! Mask expressions: which key each query may see, as a small tree of patterns the kernel
//! evaluates a tile at a time, so no `L x S` matrix is ever built.
//!
//! Every pattern answers three questions about a tile of (query rows, keys): is it empty, full
//! or partial ([`MaskExpr::classify`], exact wherever that is cheap, and for a partial tile the
//! narrowest range of keys that can be visible), which of its pairs are visible
//! ([`MaskExpr::fill`], a row at a time) and whether one pair is ([`MaskExpr::visible`]).
//! `to_dense` and `layout` are computed by the same code, so what is taught is what runs.

use std::ops::Range;
use std::sync::Arc;

use crate::bounds::CausalAlignment;
use crate::error::{shape_str, AttnError};

/// A mask pattern, or a combination of them. Positions are indices into the queries (`i`) and
/// keys (`j`); `c(i)` is the diagonal of the pattern's alignment.
///
/// Operands are shared (`Arc`), so combining two expressions is one new node whatever their
/// size, and an expression may use one subtree many times. The derived `==` and `Hash` recurse
/// once per level; [`MaskExpr::same`] compares without recursion.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MaskExpr {
    /// `j <= c(i)`.
    Causal {
        bottom_right: bool,
    },
    /// `c(i) - left <= j <= c(i) + right` (`None`: unbounded side).
    Window {
        left: Option<usize>,
        right: Option<usize>,
        bottom_right: bool,
    },
    /// `j < prefix or j <= i`: a bidirectional prefix, causal after it.
    PrefixLm {
        prefix: usize,
    },
    /// `query_ids[i] == key_ids[j]` (`key_ids` = `query_ids` when `None`).
    Document {
        query_ids: Vec<i64>,
        key_ids: Option<Vec<i64>>,
    },
    /// `i in positions or j in positions` (sorted, distinct).
    GlobalTokens {
        positions: Vec<usize>,
    },
    /// `j < count`.
    Sinks {
        count: usize,
    },
    /// `(i - j) mod stride == 0`.
    Strided {
        stride: usize,
    },
    /// `i // block == j // block or j mod block >= block - summary`.
    Fixed {
        block: usize,
        summary: usize,
    },
    /// `|i - j| <= window and |i - j| mod dilation == 0`.
    Dilated {
        window: usize,
        dilation: usize,
    },
    /// Key block `j // block` is one of `per_row` distinct blocks drawn for query block
    /// `i // block` from `seed`.
    RandomBlocks {
        block: usize,
        per_row: usize,
        seed: u64,
    },
    /// An explicit `rows x cols` bool matrix, row-major.
    Dense {
        rows: usize,
        cols: usize,
        data: Vec<bool>,
    },
    And(Arc<MaskExpr>, Arc<MaskExpr>),
    Or(Arc<MaskExpr>, Arc<MaskExpr>),
    Not(Arc<MaskExpr>),
}

/// What a mask does to a tile of (query rows, keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TileClass {
    /// No pair is visible.
    Empty,
    /// Some pairs may be visible, all within these keys (a sub-range of the tile's).
    Partial(Range<usize>),
    /// Every pair is visible.
    Full,
}

/// The sizes a mask is evaluated at: `L` queries, `S` keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskShape {
    pub num_queries: usize,
    pub num_keys: usize,
}

impl MaskShape {
    fn diagonal_offset(self, bottom_right: bool) -> i64 {
        let alignment = if bottom_right {
            CausalAlignment::BottomRight
        } else {
            CausalAlignment::TopLeft
        };
        alignment.diagonal_offset(self.num_queries, self.num_keys)
    }
}

/// The tiles of a mask (see [`MaskExpr::layout`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskLayout {
    /// `(row tiles, key tiles)` states: 0 = empty, 1 = partial, 2 = full; row-major.
    pub states: Vec<u8>,
    pub row_tiles: usize,
    pub key_tiles: usize,
    /// Visible (query, key) pairs, counted exactly.
    pub visible_pairs: u64,
}

/// The visible keys of a row under a rule that keeps one range of keys: clipped to `keys`.
fn clip(range: Range<i64>, keys: &Range<usize>) -> Range<usize> {
    let start = range.start.clamp(keys.start as i64, keys.end as i64) as usize;
    let end = range.end.clamp(start as i64, keys.end as i64) as usize;
    start..end
}

/// Keys `c - left ..= c + right` (unbounded sides reach past any sequence).
fn window_range(diagonal: i64, left: Option<usize>, right: Option<usize>) -> Range<i64> {
    let side =
        |side: Option<usize>| side.map_or(i64::MAX / 4, |s| s.min(i64::MAX as usize / 4) as i64);
    (diagonal - side(left))..(diagonal + side(right) + 1)
}

/// The class of a tile whose rows each see one range of keys, the ranges growing with the row.
fn classify_ranges(first: Range<usize>, last: Range<usize>, keys: &Range<usize>) -> TileClass {
    let hull = first.start..last.end;
    if hull.start >= hull.end || hull.end <= keys.start || hull.start >= keys.end {
        return TileClass::Empty;
    }
    if keys.start >= last.start && keys.end <= first.end {
        return TileClass::Full;
    }
    TileClass::Partial(hull.start.max(keys.start)..hull.end.min(keys.end))
}

/// `count` distinct values below `bound` drawn from `seed` (Floyd's algorithm on SplitMix64),
/// sorted. The same arguments give the same values on every machine.
fn distinct_draws(bound: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let count = count.min(bound);
    let mut chosen: Vec<usize> = Vec::with_capacity(count);
    for top in bound - count..bound {
        let candidate = (next() % (top as u64 + 1)) as usize;
        let pick = if chosen.contains(&candidate) {
            top
        } else {
            candidate
        };
        chosen.push(pick);
    }
    chosen.sort_unstable();
    chosen
}

/// How many of the sorted `positions` lie in `range`, and the range of their indices.
fn positions_in(positions: &[usize], range: &Range<usize>) -> Range<usize> {
    let start = positions.partition_point(|&p| p < range.start);
    let end = positions.partition_point(|&p| p < range.end);
    start..end
}

/// The smallest and largest of `values`.
fn min_max(values: &[i64]) -> (i64, i64) {
    values
        .iter()
        .fold((i64::MAX, i64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// The first `j >= from` with `j ≡ residue (mod step)`.
fn first_congruent(from: usize, residue: i64, step: usize) -> usize {
    let step_i = step as i64;
    let offset = (residue - from as i64).rem_euclid(step_i);
    from + offset as usize
}

impl MaskExpr {
    /// Refuses a mask that cannot be evaluated for `L` queries and `S` keys: a pattern that is
    /// no pattern ([`MaskExpr::check_pattern`]), ids or arrays of another length, positions
    /// past both lengths, lengths past [`MAX_MASK_LENGTH`], trees deeper than
    /// [`MAX_MASK_DEPTH`].
    pub fn check(&self, shape: MaskShape) -> Result<(), AttnError> {
        let (l, s) = (shape.num_queries, shape.num_keys);
        for (name, length) in [("L", l), ("S", s)] {
            if length > MAX_MASK_LENGTH {
                return Err(AttnError::value(
                    name,
                    format!("must be at most {MAX_MASK_LENGTH} (2^60), got {length}"),
                ));
            }
        }
        let depth = self.depth();
        if depth > MAX_MASK_DEPTH {
            return Err(AttnError::value(
                "attn_mask",
                format!(
                    "the mask expression is {depth} levels deep; at most {MAX_MASK_DEPTH} are \
                     evaluated (combine long lists of patterns in a balanced tree, or use one \
                     pattern with many positions, such as global_tokens)"
                ),
            ));
        }
        self.check_leaves(shape)
    }

    /// [`MaskExpr::check`] of each leaf, walked without recursion.
    fn check_leaves(&self, shape: MaskShape) -> Result<(), AttnError> {
        let mut pending = vec![self];
        while let Some(expr) = pending.pop() {
            match expr {
                MaskExpr::And(a, b) | MaskExpr::Or(a, b) => pending.extend([&**a, &**b]),
                MaskExpr::Not(a) => pending.push(a),
                leaf => {
                    leaf.check_pattern()?;
                    leaf.check_fit(shape)?;
                }
            }
        }
        Ok(())
    }

    /// Refuses a pattern whose own arguments make no pattern, whatever the sizes: a stride,
    /// block or dilation of 0, or a fixed summary wider than its block. The Python bindings
    /// ask when a pattern is built; [`MaskExpr::check`] asks again for trees built in Rust.
    pub fn check_pattern(&self) -> Result<(), AttnError> {
        let at_least_one = |name: &'static str, value: usize| {
            if value == 0 {
                Err(AttnError::value(name, "must be >= 1, got 0"))
            } else {
                Ok(())
            }
        };
        match self {
            MaskExpr::Strided { stride } => at_least_one("stride", *stride),
            MaskExpr::Fixed { block, summary } => {
                at_least_one("block", *block)?;
                if summary > block {
                    return Err(AttnError::value(
                        "summary",
                        format!("must be <= block ({block}), got {summary}"),
                    ));
                }
                Ok(())
            }
            MaskExpr::Dilated { dilation, .. } => at_least_one("dilation", *dilation),
            MaskExpr::RandomBlocks { block, .. } => at_least_one("block", *block),
            _ => Ok(()),
        }
    }

    /// Refuses a pattern that does not fit `L` queries and `S` keys.
    fn check_fit(&self, shape: MaskShape) -> Result<(), AttnError> {
        let (l, s) = (shape.num_queries, shape.num_keys);
        match self {
            MaskExpr::Document { query_ids, key_ids } => {
                let key_len = key_ids.as_ref().map_or(query_ids.len(), Vec::len);
                if query_ids.len() != l {
                    return Err(AttnError::shape(
                        "attn_mask",
                        format!(
                            "document ids have {} entries but there are {l} queries (L); \
                             pass one id per query{}",
                            query_ids.len(),
                            if key_ids.is_none() && l != s {
                                " and kv_ids= for the keys"
                            } else {
                                ""
                            }
                        ),
                    ));
                }
                if key_len != s {
                    return Err(AttnError::shape(
                        "attn_mask",
                        format!(
                            "document {} have {key_len} entries but there are {s} keys (S)",
                            if key_ids.is_some() { "kv_ids" } else { "ids" }
                        ),
                    ));
                }
            }
            MaskExpr::GlobalTokens { positions } => {
                if let Some(&last) = positions.last() {
                    if last >= l.max(s) {
                        return Err(AttnError::value(
                            "attn_mask",
                            format!(
                                "global token position {last} is past both the {l} queries \
                                 and the {s} keys"
                            ),
                        ));
                    }
                }
            }
            MaskExpr::Dense { rows, cols, .. } if (*rows, *cols) != (l, s) => {
                return Err(AttnError::shape(
                    "attn_mask",
                    format!(
                        "from_array mask has shape {} but the call needs (L, S) = {}",
                        shape_str(&[*rows, *cols]),
                        shape_str(&[l, s])
                    ),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Depth of the tree (a leaf is 1): how many scratch rows [`MaskExpr::fill`] needs.
    /// Walked without recursion, so any depth can be measured (and refused by `check`).
    pub fn depth(&self) -> usize {
        let (mut deepest, mut pending) = (0, vec![(self, 1)]);
        while let Some((expr, depth)) = pending.pop() {
            deepest = deepest.max(depth);
            match expr {
                MaskExpr::And(a, b) | MaskExpr::Or(a, b) => {
                    pending.extend([(&**a, depth + 1), (&**b, depth + 1)])
                }
                MaskExpr::Not(a) => pending.push((a, depth + 1)),
                _ => {}
            }
        }
        deepest
    }

    /// Whether `self` and `other` are the same expression, compared without recursion (pairs
    /// of operands wait on a stack; a subtree both share is equal without a look).
    pub fn same(&self, other: &MaskExpr) -> bool {
        let mut pending = vec![(self, other)];
        while let Some((a, b)) = pending.pop() {
            if std::ptr::eq(a, b) {
                continue;
            }
            match (a, b) {
                (MaskExpr::And(a1, a2), MaskExpr::And(b1, b2))
                | (MaskExpr::Or(a1, a2), MaskExpr::Or(b1, b2)) => {
                    pending.extend([(&**a1, &**b1), (&**a2, &**b2)])
                }
                (MaskExpr::Not(a1), MaskExpr::Not(b1)) => pending.push((a1, b1)),
                (MaskExpr::And(..) | MaskExpr::Or(..) | MaskExpr::Not(..), _)
                | (_, MaskExpr::And(..) | MaskExpr::Or(..) | MaskExpr::Not(..)) => return false,
                // Two patterns: the derived `==` compares their fields, with nothing to recurse into.
                (a, b) if a != b => return false,
                _ => {}
            }
        }
        true
    }

    /// Whether query `i` may see key `j`.
    pub fn visible(&self, shape: MaskShape, i: usize, j: usize) -> bool {
        let (ii, ji) = (i as i64, j as i64);
        match self {
            MaskExpr::Causal { bottom_right } => ji <= ii + shape.diagonal_offset(*bottom_right),
            MaskExpr::Window {
                left,
                right,
                bottom_right,
            } => {
                window_range(ii + shape.diagonal_offset(*bottom_right), *left, *right).contains(&ji)
            }
            MaskExpr::PrefixLm { prefix } => j < *prefix || j <= i,
            MaskExpr::Document { query_ids, key_ids } => {
                query_ids[i] == key_ids.as_ref().unwrap_or(query_ids)[j]
            }
            MaskExpr::GlobalTokens { positions } => {
                positions.binary_search(&i).is_ok() || positions.binary_search(&j).is_ok()
            }
            MaskExpr::Sinks { count } => j < *count,
            MaskExpr::Strided { stride } => (ii - ji).rem_euclid(*stride as i64) == 0,
            MaskExpr::Fixed { block, summary } => {
                i / block == j / block || j % block >= block - summary
            }
            MaskExpr::Dilated { window, dilation } => {
                let distance = i.abs_diff(j);
                distance <= *window && distance.is_multiple_of(*dilation)
            }
            MaskExpr::RandomBlocks {
                block,
                per_row,
                seed,
            } => self
                .random_picks(shape, i / block, *block, *per_row, *seed)
                .contains(&(j / block)),
            MaskExpr::Dense { cols, data, .. } => data[i * cols + j],
            MaskExpr::And(a, b) => a.visible(shape, i, j) && b.visible(shape, i, j),
            MaskExpr::Or(a, b) => a.visible(shape, i, j) || b.visible(shape, i, j),
            MaskExpr::Not(a) => !a.visible(shape, i, j),
        }
    }

    /// The key blocks query block `row_block` sees under [`MaskExpr::RandomBlocks`].
    fn random_picks(
        &self,
        shape: MaskShape,
        row_block: usize,
        block: usize,
        per_row: usize,
        seed: u64,
    ) -> Vec<usize> {
        let key_blocks = shape.num_keys.div_ceil(block);
        let row_seed = seed ^ (row_block as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        distinct_draws(key_blocks, per_row, row_seed)
    }

    /// Empty, full or partial for the tile `rows x keys` (both non-empty). Empty and full are
    /// exact except where noted; partial says only that the tile needs per-pair checks.
    pub fn classify(
        &self,
        shape: MaskShape,
        rows: &Range<usize>,
        keys: &Range<usize>,
    ) -> TileClass {
        let whole = TileClass::Partial(keys.clone());
        let (first, last) = (rows.start as i64, rows.end as i64 - 1);
        match self {
            MaskExpr::Causal { bottom_right } => {
                let offset = shape.diagonal_offset(*bottom_right);
                let range = |row: i64| clip(i64::MIN / 4..row + offset + 1, &(0..usize::MAX / 4));
                classify_ranges(range(first), range(last), keys)
            }
            MaskExpr::Window {
                left,
                right,
                bottom_right,
            } => {
                let offset = shape.diagonal_offset(*bottom_right);
                let range = |row: i64| {
                    clip(
                        window_range(row + offset, *left, *right),
                        &(0..usize::MAX / 4),
                    )
                };
                classify_ranges(range(first), range(last), keys)
            }
            MaskExpr::PrefixLm { prefix } => {
                let range = |row: i64| 0..(*prefix).max(row as usize + 1);
                classify_ranges(range(first), range(last), keys)
            }
            MaskExpr::Sinks { count } => classify_ranges(0..*count, 0..*count, keys),
            MaskExpr::Document { query_ids, key_ids } => {
                let key_ids = key_ids.as_ref().unwrap_or(query_ids);
                let (q_lo, q_hi) = min_max(&query_ids[rows.clone()]);
                let (k_lo, k_hi) = min_max(&key_ids[keys.clone()]);
                if q_hi < k_lo || k_hi < q_lo {
                    TileClass::Empty
                } else if q_lo == q_hi && k_lo == k_hi {
                    TileClass::Full
                } else {
                    // Unsorted ids may share no value though their ranges overlap: unsure.
                    whole
                }
            }
            MaskExpr::GlobalTokens { positions } => {
                let global_rows = positions_in(positions, rows).len();
                let global_keys = positions_in(positions, keys);
                if global_rows == rows.len() || global_keys.len() == keys.len() {
                    TileClass::Full
                } else if global_rows > 0 {
                    whole
                } else if global_keys.is_empty() {
                    TileClass::Empty
                } else {
                    TileClass::Partial(
                        positions[global_keys.start]..positions[global_keys.end - 1] + 1,
                    )
                }
            }
            MaskExpr::Strided { stride } => {
                let stride = *stride as i64;
                let (lo, hi) = (first - (keys.end as i64 - 1), last - keys.start as i64);
                let multiple_at_or_below_hi = hi.div_euclid(stride) * stride;
                if stride == 1 {
                    TileClass::Full
                } else if multiple_at_or_below_hi < lo {
                    TileClass::Empty
                } else if lo == hi {
                    TileClass::Full
                } else {
                    whole
                }
            }
            MaskExpr::Fixed { block, summary } => self.classify_fixed(rows, keys, *block, *summary),
            MaskExpr::Dilated { window, dilation } => {
                let (lo, hi) = (first - (keys.end as i64 - 1), last - keys.start as i64);
                let (w, d) = (*window as i64, *dilation as i64);
                let (lo_in, hi_in) = (lo.max(-w), hi.min(w));
                // Multiples of d in [lo_in, hi_in]: none means no visible pair.
                if lo_in > hi_in || hi_in.div_euclid(d) * d < lo_in {
                    TileClass::Empty
                } else if (d == 1 || lo == hi) && lo >= -w && hi <= w {
                    TileClass::Full
                } else {
                    whole
                }
            }
            MaskExpr::RandomBlocks {
                block,
                per_row,
                seed,
            } => self.classify_random_blocks(shape, rows, keys, (*block, *per_row, *seed)),
            MaskExpr::Dense { cols, data, .. } => {
                let (mut any, mut all) = (false, true);
                for row in rows.clone() {
                    for &cell in &data[row * cols + keys.start..row * cols + keys.end] {
                        any |= cell;
                        all &= cell;
                    }
                }
                match (any, all) {
                    (false, _) => TileClass::Empty,
                    (true, true) => TileClass::Full,
                    (true, false) => whole,
                }
            }
            MaskExpr::And(..) | MaskExpr::Or(..) | MaskExpr::Not(..) => {
                self.classify_combination(shape, rows, keys)
            }
        }
    }

    /// [`MaskExpr::classify`] of random blocks: the drawn key blocks of each query block.
    fn classify_random_blocks(
        &self,
        shape: MaskShape,
        rows: &Range<usize>,
        keys: &Range<usize>,
        (block, per_row, seed): (usize, usize, u64),
    ) -> TileClass {
        let key_blocks = keys.start / block..(keys.end - 1) / block + 1;
        let row_blocks = rows.start / block..(rows.end - 1) / block + 1;
        let mut seen = None::<Range<usize>>;
        let mut all_rows_all_keys = true;
        for row_block in row_blocks {
            let picks = self.random_picks(shape, row_block, block, per_row, seed);
            let inside: Vec<usize> = picks
                .into_iter()
                .filter(|b| key_blocks.contains(b))
                .collect();
            all_rows_all_keys &= inside.len() == key_blocks.len();
            if let (Some(&lo), Some(&hi)) = (inside.first(), inside.last()) {
                let span = (lo * block).max(keys.start)..((hi + 1) * block).min(keys.end);
                seen = Some(match seen {
                    None => span,
                    Some(s) => s.start.min(span.start)..s.end.max(span.end),
                });
            }
        }
        match seen {
            None => TileClass::Empty,
            Some(_) if all_rows_all_keys => TileClass::Full,
            Some(span) => TileClass::Partial(span),
        }
    }

    /// [`MaskExpr::classify`] of `&`, `|` and `~` from their operands' classes.
    fn classify_combination(
        &self,
        shape: MaskShape,
        rows: &Range<usize>,
        keys: &Range<usize>,
    ) -> TileClass {
        match self {
            MaskExpr::And(a, b) => match a.classify(shape, rows, keys) {
                TileClass::Empty => TileClass::Empty,
                TileClass::Full => b.classify(shape, rows, keys),
                TileClass::Partial(hull_a) => match b.classify(shape, rows, keys) {
                    TileClass::Empty => TileClass::Empty,
                    TileClass::Full => TileClass::Partial(hull_a),
                    TileClass::Partial(hull_b) => {
                        let hull = hull_a.start.max(hull_b.start)..hull_a.end.min(hull_b.end);
                        if hull.is_empty() {
                            TileClass::Empty
                        } else {
                            TileClass::Partial(hull)
                        }
                    }
                },
            },
            MaskExpr::Or(a, b) => match a.classify(shape, rows, keys) {
                TileClass::Full => TileClass::Full,
                TileClass::Empty => b.classify(shape, rows, keys),
                TileClass::Partial(hull_a) => match b.classify(shape, rows, keys) {
                    TileClass::Full => TileClass::Full,
                    TileClass::Empty => TileClass::Partial(hull_a),
                    // Exact pairs of the two may still cover the tile: unsure, so partial.
                    TileClass::Partial(hull_b) => TileClass::Partial(
                        hull_a.start.min(hull_b.start)..hull_a.end.max(hull_b.end),
                    ),
                },
            },
            MaskExpr::Not(a) => match a.classify(shape, rows, keys) {
                TileClass::Empty => TileClass::Full,
                TileClass::Full => TileClass::Empty,
                TileClass::Partial(_) => TileClass::Partial(keys.clone()),
            },
            _ => unreachable!("only combinations are classified here"),
        }
    }

    fn classify_fixed(
        &self,
        rows: &Range<usize>,
        keys: &Range<usize>,
        block: usize,
        summary: usize,
    ) -> TileClass {
        let row_blocks = rows.start / block..=(rows.end - 1) / block;
        let key_blocks = keys.start / block..=(keys.end - 1) / block;
        let same_block =
            row_blocks.start() <= key_blocks.end() && key_blocks.start() <= row_blocks.end();
        let first_summary = first_congruent(keys.start, (block - summary) as i64, block);
        let any_summary = summary > 0
            && (keys.len() >= block || {
                let offset = keys.start % block;
                offset >= block - summary || first_summary < keys.end
            });
        let one_block = row_blocks.start() == row_blocks.end()
            && key_blocks.start() == key_blocks.end()
            && row_blocks.start() == key_blocks.start();
        let all_summary =
            keys.start / block == (keys.end - 1) / block && keys.start % block >= block - summary;
        if one_block || all_summary {
            TileClass::Full
        } else if !same_block && !any_summary {
            TileClass::Empty
        } else {
            TileClass::Partial(keys.clone())
        }
    }

    /// Writes the visibility of every pair of the tile `rows x keys` into `out` (row-major,
    /// `rows.len() x keys.len()`). `spare` holds scratch rows for combinations; it grows as
    /// needed and is kept between calls.
    pub fn fill(
        &self,
        shape: MaskShape,
        rows: &Range<usize>,
        keys: &Range<usize>,
        out: &mut [bool],
        spare: &mut Vec<Vec<bool>>,
    ) {
        let width = keys.len();
        let out = &mut out[..rows.len() * width];
        match self {
            MaskExpr::And(a, b) | MaskExpr::Or(a, b) => {
                let is_and = matches!(self, MaskExpr::And(..));
                match (is_and, b.classify(shape, rows, keys)) {
                    (true, TileClass::Empty) => return out.fill(false),
                    (false, TileClass::Full) => return out.fill(true),
                    (true, TileClass::Full) | (false, TileClass::Empty) => {
                        return a.fill(shape, rows, keys, out, spare)
                    }
                    _ => {}
                }
                a.fill(shape, rows, keys, out, spare);
                let mut other = spare.pop().unwrap_or_default();
                other.clear();
                other.resize(out.len(), false);
                b.fill(shape, rows, keys, &mut other, spare);
                if is_and {
                    out.iter_mut().zip(&other).for_each(|(o, &x)| *o &= x);
                } else {
                    out.iter_mut().zip(&other).for_each(|(o, &x)| *o |= x);
                }
                spare.push(other);
            }
            MaskExpr::Not(a) => {
                a.fill(shape, rows, keys, out, spare);
                out.iter_mut().for_each(|o| *o = !*o);
            }
            _ => {
                for (row, out_row) in rows.clone().zip(out.chunks_exact_mut(width.max(1))) {
                    self.fill_row(shape, row, keys, out_row);
                }
            }
        }
    }

    /// One row of a leaf pattern: `out[c]` = whether query `row` sees key `keys.start + c`.
    fn fill_row(&self, shape: MaskShape, row: usize, keys: &Range<usize>, out: &mut [bool]) {
        let set_range = |out: &mut [bool], range: Range<usize>| {
            out.fill(false);
            out[range.start - keys.start..range.end - keys.start].fill(true);
        };
        let set_every = |out: &mut [bool], from: usize, to: usize, step: usize| {
            let mut j = from;
            while j < to {
                out[j - keys.start] = true;
                j += step;
            }
        };
        let i = row as i64;
        match self {
            MaskExpr::Causal { bottom_right } => {
                let end = i + shape.diagonal_offset(*bottom_right) + 1;
                set_range(out, clip(0..end, keys));
            }
            MaskExpr::Window {
                left,
                right,
                bottom_right,
            } => {
                let diagonal = i + shape.diagonal_offset(*bottom_right);
                set_range(out, clip(window_range(diagonal, *left, *right), keys));
            }
            MaskExpr::PrefixLm { prefix } => {
                set_range(out, clip(0..(*prefix).max(row + 1) as i64, keys));
            }
            MaskExpr::Sinks { count } => set_range(out, clip(0..*count as i64, keys)),
            MaskExpr::Document { query_ids, key_ids } => {
                let id = query_ids[row];
                let key_ids = &key_ids.as_ref().unwrap_or(query_ids)[keys.clone()];
                out.iter_mut().zip(key_ids).for_each(|(o, &k)| *o = k == id);
            }
            MaskExpr::GlobalTokens { positions } => {
                let global_row = positions.binary_search(&row).is_ok();
                out.fill(global_row);
                if !global_row {
                    for &p in &positions[positions_in(positions, keys)] {
                        out[p - keys.start] = true;
                    }
                }
            }
            MaskExpr::Strided { stride } => {
                out.fill(false);
                let from = first_congruent(keys.start, i, *stride);
                set_every(out, from, keys.end, *stride);
            }
            MaskExpr::Fixed { block, summary } => {
                // Ends past every length are cut at the longest one, so they fit an i64.
                let end_of = |start: usize| start.saturating_add(*block).min(MAX_MASK_LENGTH);
                let own = row / block * block;
                set_range(out, clip(own as i64..end_of(own) as i64, keys));
                // Each block's last `summary` keys: one range per block the keys cross, never
                // one pass per summary position (a summary may be far wider than the keys).
                let mut block_start = keys.start / block * block;
                while *summary > 0 && block_start < keys.end {
                    let block_end = block_start.saturating_add(*block);
                    let summary_start = (block_end - summary).min(MAX_MASK_LENGTH);
                    let summary_keys = clip(summary_start as i64..end_of(block_start) as i64, keys);
                    out[summary_keys.start - keys.start..summary_keys.end - keys.start].fill(true);
                    block_start = block_end;
                }
            }
            MaskExpr::Dilated { window, dilation } => {
                out.fill(false);
                let within = clip(window_range(i, Some(*window), Some(*window)), keys);
                let from = first_congruent(within.start, i, *dilation);
                set_every(out, from, within.end, *dilation);
            }
            MaskExpr::RandomBlocks {
                block,
                per_row,
                seed,
            } => {
                out.fill(false);
                for pick in self.random_picks(shape, row / block, *block, *per_row, *seed) {
                    let range = clip((pick * block) as i64..((pick + 1) * block) as i64, keys);
                    out[range.start - keys.start..range.end - keys.start].fill(true);
                }
            }
            MaskExpr::Dense { cols, data, .. } => {
                out.copy_from_slice(&data[row * cols + keys.start..row * cols + keys.end]);
            }
            MaskExpr::And(..) | MaskExpr::Or(..) | MaskExpr::Not(..) => {
                unreachable!("combinations are filled a tile at a time")
            }
        }
    }

    /// The `L x S` matrix of visible pairs, row-major.
    pub fn to_dense(&self, shape: MaskShape) -> Result<Vec<bool>, AttnError> {
        self.check(shape)?;
        let (l, s) = (shape.num_queries, shape.num_keys);
        let mut out = crate::memory::filled(&[l, s], false, "to_dense")?;
        let mut spare = Vec::new();
        // A band of rows at a time keeps the scratch rows small.
        const BAND: usize = 64;
        if s > 0 {
            for (band, chunk) in out.chunks_mut(BAND * s).enumerate() {
                let rows = band * BAND..(band * BAND + BAND).min(l);
                self.fill(shape, &rows, &(0..s), chunk, &mut spare);
            }
        }
        Ok(out)
    }

    /// Rows `rows` of the `L x S` matrix (each below `L`), row-major: a sample of a long mask.
    pub fn dense_rows(&self, shape: MaskShape, rows: &[usize]) -> Result<Vec<bool>, AttnError> {
        self.check(shape)?;
        if let Some(&bad) = rows.iter().find(|&&row| row >= shape.num_queries) {
            return Err(AttnError::value(
                "rows",
                format!("row {bad} is past the {} queries", shape.num_queries),
            ));
        }
        let s = shape.num_keys;
        let mut out = crate::memory::filled(&[rows.len(), s], false, "rows")?;
        let mut spare = Vec::new();
        for (&row, chunk) in rows.iter().zip(out.chunks_mut(s.max(1))) {
            self.fill(shape, &(row..row + 1), &(0..s), chunk, &mut spare);
        }
        Ok(out)
    }

    /// Tiles of `block x block` pairs classified as empty, partial or full, and the exact count
    /// of visible pairs (partial tiles are evaluated pair by pair to count them). Refused, like
    /// [`MaskExpr::to_dense`], when its tiles would not fit in memory, and when its partial
    /// tiles hold more than [`LAYOUT_MAX_PARTIAL_PAIRS`] pairs to evaluate one by one.
    pub fn layout(&self, shape: MaskShape, block: usize) -> Result<MaskLayout, AttnError> {
        self.check(shape)?;
        if block == 0 {
            return Err(AttnError::value("block", "must be >= 1, got 0"));
        }
        let (l, s) = (shape.num_queries, shape.num_keys);
        if (l as u128) * (s as u128) > u64::MAX as u128 {
            return Err(AttnError::value(
                "L",
                format!("{l} x {s} pairs are more than a layout can count; use shorter lengths"),
            ));
        }
        let (row_tiles, key_tiles) = (l.div_ceil(block), s.div_ceil(block));
        if (row_tiles as u128) * (key_tiles as u128) > LAYOUT_MAX_TILES {
            return Err(AttnError::value(
                "block",
                format!(
                    "{l} x {s} in blocks of {block} makes {row_tiles} x {key_tiles} tiles, more \
                     than {LAYOUT_MAX_TILES}; use a larger block"
                ),
            ));
        }
        let mut states = crate::memory::filled(&[row_tiles, key_tiles], 0u8, "block")?;
        let (mut visible_pairs, mut partial_pairs) = (0u64, 0u64);
        let (mut spare, mut scratch) = (Vec::new(), Vec::new());
        for (row_tile, tile_states) in states.chunks_mut(key_tiles.max(1)).enumerate() {
            let row_start = row_tile * block;
            // Never past the length, even where `start + block` would overflow.
            let rows = row_start..row_start + block.min(l - row_start);
            for (key_tile, state) in tile_states.iter_mut().enumerate() {
                let key_start = key_tile * block;
                let keys = key_start..key_start + block.min(s - key_start);
                let area = rows.len() as u64 * keys.len() as u64;
                let count = match self.classify(shape, &rows, &keys) {
                    TileClass::Empty => 0,
                    TileClass::Full => area,
                    TileClass::Partial(_) => {
                        partial_pairs += area;
                        if partial_pairs > LAYOUT_MAX_PARTIAL_PAIRS {
                            return Err(AttnError::value(
                                "block",
                                format!(
                                    "the partial tiles of {l} x {s} in blocks of {block} hold \
                                     more than {LAYOUT_MAX_PARTIAL_PAIRS} pairs to evaluate one \
                                     by one; use shorter lengths or a smaller block"
                                ),
                            ));
                        }
                        self.count_visible(shape, &rows, &keys, &mut scratch, &mut spare)
                    }
                };
                // An unsure class is made exact here, where every pair is known.
                *state = match count {
                    0 => 0,
                    c if c == area => 2,
                    _ => 1,
                };
                visible_pairs += count;
            }
        }
        Ok(MaskLayout {
            states,
            row_tiles,
            key_tiles,
            visible_pairs,
        })
    }

    /// Visible pairs of a tile, evaluated in pieces of at most `COUNT_PIECE` pairs so the
    /// scratch stays small whatever the tile's size.
    fn count_visible(
        &self,
        shape: MaskShape,
        rows: &Range<usize>,
        keys: &Range<usize>,
        scratch: &mut Vec<bool>,
        spare: &mut Vec<Vec<bool>>,
    ) -> u64 {
        const COUNT_PIECE: usize = 1 << 16;
        let key_piece = keys.len().clamp(1, COUNT_PIECE);
        let row_piece = (COUNT_PIECE / key_piece).max(1);
        let mut count = 0u64;
        for row_start in rows.clone().step_by(row_piece) {
            let piece_rows = row_start..rows.end.min(row_start + row_piece);
            for key_start in keys.clone().step_by(key_piece) {
                let piece_keys = key_start..keys.end.min(key_start + key_piece);
                scratch.clear();
                scratch.resize(piece_rows.len() * piece_keys.len(), false);
                self.fill(shape, &piece_rows, &piece_keys, scratch, spare);
                count += scratch.iter().filter(|&&v| v).count() as u64;
            }
        }
        count
    }
}

/// Deepest mask expression evaluated: evaluation recurses once per level on the worker
/// threads' stacks, and this depth stays far inside them.
pub const MAX_MASK_DEPTH: usize = 1024;
/// Longest `L` or `S` a mask is evaluated for: positions and diagonals stay exact in `i64`.
pub const MAX_MASK_LENGTH: usize = 1 << 60;

/// Most tiles a layout may hold (one byte of state each).
pub const LAYOUT_MAX_TILES: u128 = 1 << 28;
/// Most pairs a layout evaluates one by one in its partial tiles (a few seconds of work).
pub const LAYOUT_MAX_PARTIAL_PAIRS: u64 = 1 << 32;

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(l: usize, s: usize) -> MaskShape {
        MaskShape {
            num_queries: l,
            num_keys: s,
        }
    }

    fn patterns() -> Vec<MaskExpr> {
        let ids: Vec<i64> = (0..37).map(|i| i / 9).collect();
        vec![
            MaskExpr::Causal {
                bottom_right: false,
            },
            MaskExpr::Causal { bottom_right: true },
            MaskExpr::Window {
                left: Some(3),
                right: Some(1),
                bottom_right: true,
            },
            MaskExpr::Window {
                left: None,
                right: Some(0),
                bottom_right: false,
            },
            MaskExpr::PrefixLm { prefix: 5 },
            MaskExpr::Document {
                query_ids: ids.clone(),
                key_ids: Some((0..41).map(|i| i / 10).collect()),
            },
            MaskExpr::GlobalTokens {
                positions: vec![0, 7, 8, 30],
            },
            MaskExpr::Sinks { count: 4 },
            MaskExpr::Strided { stride: 4 },
            MaskExpr::Fixed {
                block: 6,
                summary: 2,
            },
            MaskExpr::Dilated {
                window: 6,
                dilation: 3,
            },
            MaskExpr::RandomBlocks {
                block: 8,
                per_row: 2,
                seed: 11,
            },
            MaskExpr::And(
                Arc::new(MaskExpr::Causal {
                    bottom_right: false,
                }),
                Arc::new(MaskExpr::Or(
                    Arc::new(MaskExpr::Window {
                        left: Some(4),
                        right: Some(4),
                        bottom_right: false,
                    }),
                    Arc::new(MaskExpr::Not(Arc::new(MaskExpr::Sinks { count: 20 }))),
                )),
            ),
        ]
    }

    /// Every tile of every size and offset: empty and full tiles agree with the pairs, and a
    /// partial tile's key range holds all its visible pairs.
    #[test]
    fn classify_agrees_with_visible_at_every_tile() {
        let shape = shape(37, 41);
        for expr in patterns() {
            for (rows_len, keys_len) in [(1, 1), (3, 5), (8, 8), (7, 16)] {
                for r0 in (0..37).step_by(2) {
                    for k0 in (0..41).step_by(3) {
                        let rows = r0..(r0 + rows_len).min(37);
                        let keys = k0..(k0 + keys_len).min(41);
                        let pairs: Vec<(usize, usize, bool)> = rows
                            .clone()
                            .flat_map(|i| keys.clone().map(move |j| (i, j)))
                            .map(|(i, j)| (i, j, expr.visible(shape, i, j)))
                            .collect();
                        match expr.classify(shape, &rows, &keys) {
                            TileClass::Empty => assert!(pairs.iter().all(|p| !p.2), "{expr:?}"),
                            TileClass::Full => assert!(pairs.iter().all(|p| p.2), "{expr:?}"),
                            TileClass::Partial(hull) => {
                                assert!(hull.start >= keys.start && hull.end <= keys.end);
                                for &(_, j, v) in &pairs {
                                    assert!(!v || hull.contains(&j), "{expr:?} {rows:?} {keys:?}");
                                }
                            }
                        }
                        let mut out = vec![false; rows.len() * keys.len()];
                        expr.fill(shape, &rows, &keys, &mut out, &mut Vec::new());
                        let expected: Vec<bool> = pairs.iter().map(|p| p.2).collect();
                        assert_eq!(out, expected, "{expr:?} {rows:?} {keys:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn exact_patterns_are_never_unsure() {
        // Causal, window, sinks: a partial tile always mixes visible and hidden pairs.
        let shape = shape(40, 40);
        let exact = [
            MaskExpr::Causal {
                bottom_right: false,
            },
            MaskExpr::Window {
                left: Some(5),
                right: Some(2),
                bottom_right: false,
            },
            MaskExpr::Sinks { count: 9 },
        ];
        for expr in exact {
            let layout = expr.layout(shape, 8).unwrap();
            for (index, &state) in layout.states.iter().enumerate() {
                let rows = index / layout.key_tiles * 8..(index / layout.key_tiles * 8 + 8);
                let keys = index % layout.key_tiles * 8..(index % layout.key_tiles * 8 + 8);
                let class = expr.classify(shape, &rows, &keys);
                let expected = match class {
                    TileClass::Empty => 0,
                    TileClass::Partial(_) => 1,
                    TileClass::Full => 2,
                };
                assert_eq!(state, expected, "{expr:?} {rows:?} {keys:?}");
            }
        }
    }

    #[test]
    fn random_blocks_draw_distinct_blocks_per_row_block() {
        let expr = MaskExpr::RandomBlocks {
            block: 4,
            per_row: 3,
            seed: 5,
        };
        let dense = expr.to_dense(shape(16, 32)).unwrap();
        for row in 0..16 {
            let seen = (0..8).filter(|&b| dense[row * 32 + b * 4]).count();
            assert_eq!(seen, 3);
        }
        assert_eq!(distinct_draws(3, 10, 1), vec![0, 1, 2]);
    }

    #[test]
    fn check_names_the_mismatch() {
        let doc = MaskExpr::Document {
            query_ids: vec![0, 0, 1],
            key_ids: None,
        };
        assert!(doc.check(shape(3, 3)).is_ok());
        let error = doc.check(shape(4, 4)).unwrap_err().to_string();
        assert!(
            error.contains("attn_mask") && error.contains("4 queries"),
            "{error}"
        );
        let global = MaskExpr::GlobalTokens { positions: vec![9] };
        assert!(global.check(shape(5, 5)).is_err());
    }

    /// A fixed pattern's summary keys are found block by block, not position by position: a
    /// summary wider than the sequence costs nothing more.
    #[test]
    fn fixed_summaries_wider_than_the_keys_are_immediate() {
        let huge = MaskExpr::Fixed {
            block: 1 << 40,
            summary: 1 << 40,
        };
        assert_eq!(huge.to_dense(shape(3, 8)).unwrap(), vec![true; 24]);
        // Keys 0..8 in blocks of 4 with a summary of 3: keys 1, 2, 3 and 5, 6, 7 for everyone.
        let fixed = MaskExpr::Fixed {
            block: 4,
            summary: 3,
        };
        let dense = fixed.to_dense(shape(8, 8)).unwrap();
        for (index, &seen) in dense.iter().enumerate() {
            let (row, key) = (index / 8, index % 8);
            assert_eq!(seen, row / 4 == key / 4 || key % 4 >= 1, "({row}, {key})");
        }
    }

    /// `~` applied `depth - 1` times to a causal mask.
    fn negations(depth: usize) -> MaskExpr {
        let mut expr = MaskExpr::Causal {
            bottom_right: false,
        };
        for _ in 1..depth {
            expr = MaskExpr::Not(Arc::new(expr));
        }
        expr
    }

    /// The deepest accepted expression is evaluated (on worker threads, through attention:
    /// see the attention tests) and one level more is refused, by a check that itself never
    /// recurses.
    #[test]
    fn depth_is_measured_without_recursion_and_bounded() {
        let deepest = negations(MAX_MASK_DEPTH);
        assert_eq!(deepest.depth(), MAX_MASK_DEPTH);
        let dense = deepest.to_dense(shape(9, 9)).unwrap();
        // An odd number of negations flips causal; an even number keeps it.
        let flipped = (MAX_MASK_DEPTH - 1) % 2 == 1;
        for (index, &seen) in dense.iter().enumerate() {
            assert_eq!(seen, (index % 9 <= index / 9) != flipped, "pair {index}");
        }
        let error = negations(MAX_MASK_DEPTH + 1)
            .check(shape(9, 9))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("attn_mask") && error.contains("1025 levels"),
            "{error}"
        );
        // A left-deep chain of ORs, as `functools.reduce` builds one.
        let mut chain = MaskExpr::Sinks { count: 1 };
        for _ in 0..5000 {
            chain = MaskExpr::Or(Arc::new(chain), Arc::new(MaskExpr::Sinks { count: 1 }));
        }
        assert_eq!(chain.depth(), 5001);
        assert!(chain.check(shape(4, 4)).is_err());
        // Dropping an Arc chain recurses once per level: keep this one shallow enough to drop.
        std::mem::forget(chain);
    }

    /// `same` agrees with the derived `==`, and compares chains far deeper than a recursive
    /// comparison could walk on a test thread's stack.
    #[test]
    fn same_compares_without_recursion() {
        let all = patterns();
        for (i, a) in all.iter().enumerate() {
            for (j, b) in all.iter().enumerate() {
                assert_eq!(a.same(b), i == j, "{a:?} {b:?}");
                assert_eq!(a.same(b), a == b, "{a:?} {b:?}");
            }
        }
        let chain = |count| {
            (0..100_000).fold(MaskExpr::Sinks { count }, |expr, _| {
                MaskExpr::Not(Arc::new(expr))
            })
        };
        let (first, second, other) = (chain(1), chain(1), chain(2));
        assert!(first.same(&second) && !first.same(&other));
        let shared = Arc::new(other);
        let both = MaskExpr::And(shared.clone(), shared.clone());
        assert!(both.same(&MaskExpr::And(shared.clone(), shared)));
        // Dropping an Arc chain recurses once per level: these are too deep to drop.
        std::mem::forget((first, second, both));
    }

    /// A pattern whose own arguments make no pattern is refused by name, alone and inside a
    /// tree.
    #[test]
    fn check_pattern_names_the_argument() {
        let refused = [
            (MaskExpr::Strided { stride: 0 }, "stride"),
            (
                MaskExpr::Fixed {
                    block: 0,
                    summary: 0,
                },
                "block",
            ),
            (
                MaskExpr::Fixed {
                    block: 4,
                    summary: 5,
                },
                "summary",
            ),
            (
                MaskExpr::Dilated {
                    window: 3,
                    dilation: 0,
                },
                "dilation",
            ),
            (
                MaskExpr::RandomBlocks {
                    block: 0,
                    per_row: 1,
                    seed: 0,
                },
                "block",
            ),
        ];
        for (expr, name) in refused {
            let error = expr.check_pattern().unwrap_err().to_string();
            assert!(error.starts_with(&format!("{name}: must be")), "{error}");
            let tree = MaskExpr::Or(Arc::new(MaskExpr::Sinks { count: 1 }), Arc::new(expr));
            assert_eq!(tree.check(shape(4, 4)).unwrap_err().to_string(), error);
        }
        assert!(patterns().iter().all(|expr| expr.check_pattern().is_ok()));
    }

    /// A layout counts exactly what `to_dense` shows, for every block size, and refuses
    /// sizes it could not hold or count instead of aborting or wrapping.
    #[test]
    fn layout_counts_exactly_and_refuses_what_it_cannot_hold() {
        for expr in patterns() {
            let dense = expr.to_dense(shape(37, 41)).unwrap();
            let visible = dense.iter().filter(|&&v| v).count() as u64;
            for block in [1, 4, 16, 64, usize::MAX] {
                let layout = expr.layout(shape(37, 41), block).unwrap();
                assert_eq!(layout.visible_pairs, visible, "{expr:?} block {block}");
                assert_eq!(layout.states.len(), layout.row_tiles * layout.key_tiles);
            }
        }
        let causal = MaskExpr::Causal {
            bottom_right: false,
        };
        let error = causal
            .layout(shape(1 << 40, 1 << 40), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(error.contains("more than a layout can count"), "{error}");
        let huge = shape(1 << 31, 1 << 31);
        for block in [1, 1 << 14] {
            let error = causal.layout(huge, block).unwrap_err().to_string();
            assert!(
                error.contains("block") && error.contains("tiles"),
                "{error}"
            );
        }
        let error = causal.layout(huge, 1 << 28).unwrap_err().to_string();
        assert!(error.contains("partial tiles"), "{error}");
        // Few tiles, all of them empty or full: counted without evaluating a pair.
        let sinks = MaskExpr::Sinks { count: 1 << 31 };
        let layout = sinks.layout(shape(1 << 31, 1 << 31), 1 << 30).unwrap();
        assert_eq!((layout.states, layout.visible_pairs), (vec![2; 4], 1 << 62));
        let error = causal
            .layout(shape(usize::MAX, 4), 7)
            .unwrap_err()
            .to_string();
        assert!(error.contains('L') && error.contains("2^60"), "{error}");
    }
}
