//! Random draws recorded by diffusers, fed to `pipeline::generate_from_draws` by role (img2img and
//! inpaint tests).

use std::collections::{HashMap, VecDeque};

use sdcap::pipeline::Draws;
use sdcap::Tensor;

/// Draws recorded by diffusers, by role, handed out in order and checked to be used up.
#[derive(Default)]
pub struct GivenDraws {
    pub encode: VecDeque<Vec<f32>>,
    pub initial: VecDeque<Vec<f32>>,
    pub step: VecDeque<Vec<f32>>,
}

impl GivenDraws {
    pub fn take(queue: &mut VecDeque<Vec<f32>>, role: &str, shape: &[usize]) -> Vec<f32> {
        let v = queue
            .pop_front()
            .unwrap_or_else(|| panic!("drew more {role} noise than diffusers did"));
        assert_eq!(v.len(), shape.iter().product::<usize>(), "{role} size");
        v
    }

    pub fn assert_used_up(&self, what: &str) {
        assert!(self.encode.is_empty(), "{what}: encode draws left");
        assert!(self.initial.is_empty(), "{what}: initial noise left");
        assert!(self.step.is_empty(), "{what}: step noise left");
    }

    /// `step_noise.0`, `step_noise.1`, … of a case file.
    pub fn steps_of(refs: &HashMap<String, Tensor>) -> VecDeque<Vec<f32>> {
        (0..)
            .map_while(|i| refs.get(&format!("step_noise.{i}")).map(|t| t.data.clone()))
            .collect()
    }
}

impl Draws for GivenDraws {
    fn encode(&mut self, shape: &[usize]) -> Vec<f32> {
        Self::take(&mut self.encode, "encode", shape)
    }
    fn initial(&mut self, shape: &[usize]) -> Vec<f32> {
        Self::take(&mut self.initial, "initial", shape)
    }
    fn step(&mut self, shape: &[usize]) -> Vec<f32> {
        Self::take(&mut self.step, "step", shape)
    }
}
