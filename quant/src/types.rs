//! The type table. Ids are GGML's `ggml_type` values as stored in GGUF files.

/// A GGML tensor element/block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

/// One row of the table.
#[derive(Debug)]
pub struct TypeInfo {
    pub ty: GgmlType,
    /// GGML's `ggml_type` id.
    pub id: u32,
    /// Name as GGML and stable-diffusion.cpp's `--type` spell it.
    pub name: &'static str,
    /// Values per block (1 for plain floats).
    pub block_elems: usize,
    /// Bytes per block.
    pub block_bytes: usize,
}

const fn row(
    ty: GgmlType,
    id: u32,
    name: &'static str,
    block_elems: usize,
    block_bytes: usize,
) -> TypeInfo {
    TypeInfo {
        ty,
        id,
        name,
        block_elems,
        block_bytes,
    }
}

pub(crate) static TABLE: &[TypeInfo] = &[
    row(GgmlType::F32, 0, "f32", 1, 4),
    row(GgmlType::F16, 1, "f16", 1, 2),
    row(GgmlType::Q4_0, 2, "q4_0", 32, 18),
    row(GgmlType::Q4_1, 3, "q4_1", 32, 20),
    row(GgmlType::Q5_0, 6, "q5_0", 32, 22),
    row(GgmlType::Q5_1, 7, "q5_1", 32, 24),
    row(GgmlType::Q8_0, 8, "q8_0", 32, 34),
    row(GgmlType::Q2K, 10, "q2_K", 256, 84),
    row(GgmlType::Q3K, 11, "q3_K", 256, 110),
    row(GgmlType::Q4K, 12, "q4_K", 256, 144),
    row(GgmlType::Q5K, 13, "q5_K", 256, 176),
    row(GgmlType::Q6K, 14, "q6_K", 256, 210),
    row(GgmlType::BF16, 30, "bf16", 1, 2),
];

impl GgmlType {
    pub fn info(self) -> &'static TypeInfo {
        TABLE
            .iter()
            .find(|r| r.ty == self)
            .expect("every type has a table row")
    }

    pub fn from_id(id: u32) -> Option<GgmlType> {
        TABLE.iter().find(|r| r.id == id).map(|r| r.ty)
    }

    /// Parses a name as `--type` takes it (case-insensitive: `q4_k` = `q4_K`).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TABLE
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(name))
            .map(|r| r.ty)
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    pub fn all() -> impl Iterator<Item = GgmlType> {
        TABLE.iter().map(|r| r.ty)
    }
}
