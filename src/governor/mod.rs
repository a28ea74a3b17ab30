//! The memory governor: learns the budget, predicts every stage's peak from shapes, picks settings
//! that fit (or refuses up front), and watches real memory while the job runs.

pub mod budget;
pub mod memory;
pub mod plan;
pub mod stream;
pub mod watch;

pub use budget::{parse_size, Budget, BudgetSource};
pub use plan::{plan, Plan, Residency, Stage};
