//! Which keys a query row may see under the causal and sliding-window rules.
//!
//! Both bounds of the visible range grow with the row index, so the keys a block of rows can
//! see are the span from the first row's start to the last row's end, and a key block is
//! fully visible to the whole block of rows when it lies inside every row's range.

use std::ops::Range;

/// Diagonal alignment of the causal/window rules when queries and keys differ in number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CausalAlignment {
    /// `c(i) = i` (PyTorch's `is_causal`).
    #[default]
    TopLeft,
    /// `c(i) = i + S - L` (decoding against a KV cache).
    BottomRight,
}

/// A sliding window around the diagonal: keys `c(i) - left ..= c(i) + right`; `None` = unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window {
    pub left: Option<usize>,
    pub right: Option<usize>,
}

impl Window {
    /// `window = w` keeps `w` keys on each side including the diagonal: `(w - 1, w - 1)`.
    pub fn symmetric(size: usize) -> Self {
        let side = size.saturating_sub(1);
        Window {
            left: Some(side),
            right: Some(side),
        }
    }
}

impl CausalAlignment {
    /// `c(i) - i`: where row `i`'s diagonal lies, for `num_queries` queries over `num_keys`
    /// keys. The one home of the alignment rule (bounds, masks and ALiBi all read it).
    pub(crate) fn diagonal_offset(self, num_queries: usize, num_keys: usize) -> i64 {
        match self {
            CausalAlignment::TopLeft => 0,
            CausalAlignment::BottomRight => num_keys as i64 - num_queries as i64,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    num_keys: i64,
    diagonal_offset: i64,
    causal: bool,
    left: Option<i64>,
    right: Option<i64>,
}

impl Bounds {
    pub(crate) fn new(
        num_queries: usize,
        num_keys: usize,
        causal: bool,
        alignment: CausalAlignment,
        window: Option<Window>,
    ) -> Self {
        let diagonal_offset = alignment.diagonal_offset(num_queries, num_keys);
        // Sides wider than the sequence are unbounded; clamping keeps the arithmetic in range.
        let clamp = |side: usize| side.min(num_keys + num_queries) as i64;
        let window = window.unwrap_or_default();
        Bounds {
            num_keys: num_keys as i64,
            diagonal_offset,
            causal,
            left: window.left.map(clamp),
            right: window.right.map(clamp),
        }
    }

    /// Keys visible to query `row`, as a half-open range (empty when none is).
    pub(crate) fn row_keys(&self, row: usize) -> Range<usize> {
        let diagonal = row as i64 + self.diagonal_offset;
        let mut start = 0;
        let mut end = self.num_keys;
        if self.causal {
            end = end.min(diagonal + 1);
        }
        if let Some(right) = self.right {
            end = end.min(diagonal + right + 1);
        }
        if let Some(left) = self.left {
            start = start.max(diagonal - left);
        }
        let start = start.clamp(0, self.num_keys) as usize;
        let end = end.clamp(0, self.num_keys) as usize;
        start..end.max(start)
    }

    /// Keys visible to at least one of `rows` (`rows` must not be empty).
    pub(crate) fn block_keys(&self, rows: &Range<usize>) -> Range<usize> {
        let first = self.row_keys(rows.start);
        let last = self.row_keys(rows.end - 1);
        first.start..last.end.max(first.start)
    }

    /// Query rows (of `num_queries`) that see at least one of `keys`. A row's first and last
    /// visible keys never decrease from one row to the next, so these rows are one range: those
    /// whose keys end after `keys.start` and start before `keys.end`.
    pub(crate) fn key_rows(&self, keys: &Range<usize>, num_queries: usize) -> Range<usize> {
        let first = partition_point(num_queries, |row| self.row_keys(row).end <= keys.start);
        let end = partition_point(num_queries, |row| self.row_keys(row).start < keys.end);
        first..end.max(first)
    }

    /// Whether keys `keys` are visible to every row of `rows`.
    pub(crate) fn fully_visible(&self, rows: &Range<usize>, keys: &Range<usize>) -> bool {
        let first = self.row_keys(rows.start);
        let last = self.row_keys(rows.end - 1);
        keys.start >= last.start && keys.end <= first.end
    }
}

/// The first of `0..count` where `before` fails, given that it holds on a prefix (a slice's
/// `partition_point`, over indices).
fn partition_point(count: usize, before: impl Fn(usize) -> bool) -> usize {
    let (mut low, mut high) = (0, count);
    while low < high {
        let middle = low + (high - low) / 2;
        if before(middle) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    low
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(bounds: &Bounds, row: usize, num_keys: usize) -> Vec<usize> {
        (0..num_keys)
            .filter(|&key| bounds.row_keys(row).contains(&key))
            .collect()
    }

    /// A window of `left` keys before the diagonal and `right` after it.
    fn sides(left: Option<usize>, right: Option<usize>) -> Window {
        Window { left, right }
    }

    #[test]
    fn causal_top_left_and_bottom_right() {
        let top = Bounds::new(3, 5, true, CausalAlignment::TopLeft, None);
        assert_eq!(top.row_keys(0), 0..1);
        assert_eq!(top.row_keys(2), 0..3);
        let bottom = Bounds::new(3, 5, true, CausalAlignment::BottomRight, None);
        assert_eq!(bottom.row_keys(0), 0..3);
        assert_eq!(bottom.row_keys(2), 0..5);
        // More queries than keys: the first rows of a bottom-right mask see nothing.
        let tall = Bounds::new(5, 2, true, CausalAlignment::BottomRight, None);
        assert!(tall.row_keys(0).is_empty());
        assert!(tall.row_keys(2).is_empty());
        assert_eq!(tall.row_keys(3), 0..1);
    }

    #[test]
    fn window_sides() {
        // `n` queries and keys, top-left aligned, in a window.
        let square = |n, is_causal, window| {
            Bounds::new(n, n, is_causal, CausalAlignment::TopLeft, Some(window))
        };
        let window = square(10, false, Window::symmetric(3));
        assert_eq!(window.row_keys(0), 0..3);
        assert_eq!(window.row_keys(5), 3..8);
        assert_eq!(window.row_keys(9), 7..10);
        let causal_window = square(10, true, sides(Some(2), None));
        assert_eq!(causal_window.row_keys(5), 3..6);
        let huge = square(4, false, sides(Some(usize::MAX), Some(0)));
        assert_eq!(huge.row_keys(3), 0..4);
    }

    #[test]
    fn block_classification_matches_rows() {
        let window = Some(sides(Some(7), None));
        let bounds = Bounds::new(20, 30, true, CausalAlignment::BottomRight, window);
        let rows = 4..9;
        let span = bounds.block_keys(&rows);
        for row in rows.clone() {
            for key in brute(&bounds, row, 30) {
                assert!(span.contains(&key));
            }
        }
        for start in 0..30 {
            for end in start + 1..=30 {
                let keys = start..end;
                let expected = rows
                    .clone()
                    .all(|row| keys.clone().all(|key| bounds.row_keys(row).contains(&key)));
                assert_eq!(bounds.fully_visible(&rows, &keys), expected, "{keys:?}");
            }
        }
    }

    #[test]
    fn key_rows_are_the_rows_that_see_a_key() {
        let windows = [
            None,
            Some(Window::symmetric(3)),
            Some(sides(Some(4), None)),
            Some(sides(None, Some(2))),
            Some(sides(Some(0), Some(0))),
        ];
        for (num_queries, num_keys) in [(12, 12), (5, 17), (17, 5), (1, 9), (9, 1)] {
            for causal in [false, true] {
                for alignment in [CausalAlignment::TopLeft, CausalAlignment::BottomRight] {
                    for window in windows {
                        let bounds = Bounds::new(num_queries, num_keys, causal, alignment, window);
                        for start in 0..num_keys {
                            for end in start + 1..=num_keys {
                                let keys = start..end;
                                let seeing: Vec<usize> = (0..num_queries)
                                    .filter(|&row| {
                                        keys.clone().any(|key| bounds.row_keys(row).contains(&key))
                                    })
                                    .collect();
                                let rows = bounds.key_rows(&keys, num_queries);
                                assert_eq!(
                                    rows.collect::<Vec<_>>(),
                                    seeing,
                                    "{bounds:?} keys {keys:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
