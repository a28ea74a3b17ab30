//! GGML block formats: one table row per type (block size, bytes per block, dequantize, quantize);
//! everything else dispatches through the table, so adding a type is adding a row.

mod types;

pub use types::{GgmlType, TypeInfo};

impl GgmlType {
    /// Bytes of `n` values of this type, None if `n` is not a whole number of blocks or overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let info = self.info();
        if !n.is_multiple_of(info.block_elems as u64) {
            return None;
        }
        (n / info.block_elems as u64).checked_mul(info.block_bytes as u64)
    }
}
