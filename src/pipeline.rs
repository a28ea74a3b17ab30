//! txt2img orchestration.
