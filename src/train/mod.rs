//! Training both LLaVA stages: the loop, the optimizer and schedule, checkpoints, run settings.

pub mod checkpoint;
pub mod config;
pub mod device_batches;
pub mod frozen;
pub mod lora;
pub mod micro_batch;
pub mod optim;
pub mod plot;
pub mod trainer;

pub use checkpoint::TrainerState;
pub use config::TrainConfig;
pub use trainer::{train, NonFinite, StepMetrics, StepTimes, TrainControl, TrainOutcome};
