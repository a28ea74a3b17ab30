//! Feature maps stored as horizontal bands of rows, each band its own allocation, so a streaming
//! pass can free the rows it has consumed and allocate its output as it goes.

use std::ops::Range;

use memmap2::MmapMut;

use crate::kernels::FeatureRows;

/// A band's values in their own anonymous mapping: dropping it unmaps the pages at once, so the
/// memory the cap sees follows the bands held. (With malloc, freed bands of a few MiB stay in the
/// heap: a 512² decode whose live bands peak at 287 MiB measured 516 MiB RssAnon.)
struct Band(MmapMut);

impl Band {
    fn zeroed(values: usize) -> Band {
        let map = MmapMut::map_anon(values.max(1) * 4)
            .unwrap_or_else(|e| panic!("cannot map {values} f32 for a feature-map band: {e}"));
        Band(map)
    }

    fn values(&self) -> &[f32] {
        bytemuck::cast_slice(&self.0[..])
    }

    fn values_mut(&mut self) -> &mut [f32] {
        bytemuck::cast_slice_mut(&mut self.0[..])
    }
}

/// The shape of one image's map [c, h, w] and its split into bands of `band_rows` rows (the last
/// band may be shorter). A band holds `[c][rows][w]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct BandLayout {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub band_rows: usize,
}

impl BandLayout {
    /// `band_rows: None` keeps the map whole (one band).
    pub fn new(c: usize, h: usize, w: usize, band_rows: Option<usize>) -> Self {
        let band_rows = band_rows.unwrap_or(h).clamp(1, h.max(1));
        BandLayout { c, h, w, band_rows }
    }

    pub fn bands(&self) -> usize {
        self.h.div_ceil(self.band_rows)
    }

    pub fn band_range(&self, i: usize) -> Range<usize> {
        i * self.band_rows..((i + 1) * self.band_rows).min(self.h)
    }

    fn band_bytes(&self, i: usize) -> u64 {
        let values = self.c as u64 * self.band_range(i).len() as u64 * self.w as u64;
        values.saturating_mul(4)
    }

    pub fn total_bytes(&self) -> u64 {
        (self.c as u64)
            .saturating_mul(self.h as u64)
            .saturating_mul(self.w as u64)
            .saturating_mul(4)
    }

    /// Bytes held once rows `[0, y)` have been written: every band they touch.
    pub fn bytes_written_to(&self, y: usize) -> u64 {
        let touched = y.min(self.h).div_ceil(self.band_rows);
        (0..touched).map(|i| self.band_bytes(i)).sum()
    }

    /// Bytes still held after `free_below(y)`: the bands with a row at or after `y`.
    pub fn bytes_kept_from(&self, y: usize) -> u64 {
        let dropped = y.min(self.h) / self.band_rows;
        (dropped..self.bands()).map(|i| self.band_bytes(i)).sum()
    }
}

/// One image's feature map in bands; rows are written (or added to) tile by tile and freed band by
/// band once no later tile reads them.
pub(super) struct BandedMap {
    layout: BandLayout,
    bands: Vec<Option<Band>>,
}

impl BandedMap {
    /// A map with no rows allocated yet.
    pub fn empty(layout: BandLayout) -> Self {
        BandedMap {
            layout,
            bands: (0..layout.bands()).map(|_| None).collect(),
        }
    }

    /// A copy of the NCHW image `data` [c, h, w].
    pub fn from_planes(data: &[f32], layout: BandLayout) -> Self {
        let (c, h, w) = (layout.c, layout.h, layout.w);
        assert_eq!(data.len(), c * h * w, "map size");
        let mut map = Self::empty(layout);
        for i in 0..layout.bands() {
            let r = layout.band_range(i);
            let tile: Vec<f32> = (0..c)
                .flat_map(|ch| &data[(ch * h + r.start) * w..(ch * h + r.end) * w])
                .copied()
                .collect();
            map.write_rows(r.start, &tile);
        }
        map
    }

    pub fn layout(&self) -> BandLayout {
        self.layout
    }

    /// The whole map as NCHW [c, h, w] values (every row must still be held).
    pub fn to_planes(&self) -> Vec<f32> {
        let BandLayout { c, h, w, .. } = self.layout;
        let mut out = vec![0.0; c * h * w];
        for (ch, plane) in out.chunks_mut(h * w).enumerate() {
            for (y, row) in plane.chunks_mut(w).enumerate() {
                row.copy_from_slice(self.row(ch, y));
            }
        }
        out
    }

    /// Stores `tile` [c, rows, w] as rows `y0..y0 + rows`, allocating bands as they are reached.
    pub fn write_rows(&mut self, y0: usize, tile: &[f32]) {
        self.update_rows(y0, tile, |dst, src| dst.copy_from_slice(src));
    }

    /// Adds `tile` [c, rows, w] to rows `y0..y0 + rows` (the residual connection, in place).
    pub fn add_rows(&mut self, y0: usize, tile: &[f32]) {
        self.update_rows(y0, tile, |dst, src| {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s)
        });
    }

    fn update_rows(&mut self, y0: usize, tile: &[f32], f: impl Fn(&mut [f32], &[f32])) {
        let BandLayout { c, w, .. } = self.layout;
        let rows = tile.len() / (c * w);
        assert_eq!(rows * c * w, tile.len(), "tile size");
        assert!(y0 + rows <= self.layout.h, "rows beyond the map");
        let mut y = y0;
        while y < y0 + rows {
            let i = y / self.layout.band_rows;
            let band_rows = self.layout.band_range(i);
            let n = (band_rows.end.min(y0 + rows)) - y;
            let band = self.bands[i]
                .get_or_insert_with(|| Band::zeroed(c * band_rows.len() * w))
                .values_mut();
            let (local, tile_row) = (y - band_rows.start, y - y0);
            for ch in 0..c {
                let dst = (ch * band_rows.len() + local) * w;
                let src = (ch * rows + tile_row) * w;
                f(&mut band[dst..dst + n * w], &tile[src..src + n * w]);
            }
            y += n;
        }
    }

    /// Drops every band that lies wholly above row `y`.
    pub fn free_below(&mut self, y: usize) {
        let dropped = y.min(self.layout.h) / self.layout.band_rows;
        self.bands[..dropped].iter_mut().for_each(|b| *b = None);
    }
}

impl FeatureRows for BandedMap {
    fn dims(&self) -> (usize, usize, usize) {
        (self.layout.c, self.layout.h, self.layout.w)
    }

    fn row(&self, c: usize, y: usize) -> &[f32] {
        let i = y / self.layout.band_rows;
        let band_rows = self.layout.band_range(i).len();
        let band = self.bands[i]
            .as_ref()
            .expect("row of a freed band")
            .values();
        let at = (c * band_rows + y % self.layout.band_rows) * self.layout.w;
        &band[at..at + self.layout.w]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_free_by_band() {
        let (c, h, w) = (3, 7, 4);
        let data: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
        for band in [None, Some(1), Some(3), Some(7), Some(9)] {
            let layout = BandLayout::new(c, h, w, band);
            let whole = BandedMap::from_planes(&data, layout);
            assert_eq!(whole.to_planes(), data);
            // Written in tiles of 2 rows, then added to.
            let mut map = BandedMap::empty(layout);
            for y0 in (0..h).step_by(2) {
                let rows = 2.min(h - y0);
                let tile: Vec<f32> = (0..c)
                    .flat_map(|ch| data[(ch * h + y0) * w..(ch * h + y0 + rows) * w].to_vec())
                    .collect();
                map.write_rows(y0, &tile);
                assert_eq!(
                    layout.bytes_written_to(y0 + rows),
                    map.bands
                        .iter()
                        .flatten()
                        .map(|b| b.values().len() as u64 * 4)
                        .sum::<u64>()
                );
                map.add_rows(y0, &tile);
            }
            let doubled: Vec<f32> = data.iter().map(|v| 2.0 * v).collect();
            assert_eq!(map.to_planes(), doubled);
            for y in 0..=h {
                map.free_below(y);
                let held: u64 = map
                    .bands
                    .iter()
                    .flatten()
                    .map(|b| b.values().len() as u64 * 4)
                    .sum();
                assert_eq!(held, layout.bytes_kept_from(y), "band {band:?} y {y}");
                if y < h {
                    assert_eq!(map.row(1, y), &doubled[(h + y) * w..(h + y + 1) * w]);
                }
            }
        }
    }
}
