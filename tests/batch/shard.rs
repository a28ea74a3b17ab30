//! Shard selection from `--shard`, Kubernetes and Slurm variables.

use std::collections::HashMap;

use sdcap::batch::shard::{resolve, Shard, ShardSource};

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

fn shard(i: usize, n: usize) -> Shard {
    Shard::new(i, n).unwrap()
}

#[test]
fn parses_i_of_n() {
    assert_eq!("2/5".parse::<Shard>().unwrap(), shard(2, 5));
    for bad in ["5/5", "1/0", "1", "a/b", "-1/3", "1/2/3", ""] {
        assert!(bad.parse::<Shard>().is_err(), "{bad:?} must be refused");
    }
}

#[test]
fn round_robin_covers_each_job_once() {
    for n in 1..=5 {
        for job in 0..23 {
            let owners = (0..n).filter(|&i| shard(i, n).owns(job)).count();
            assert_eq!(owners, 1, "job {job} with {n} shards");
        }
    }
}

#[test]
fn flag_wins_over_environment() {
    let e = env(&[("JOB_COMPLETION_INDEX", "1"), ("SDCAP_SHARD_COUNT", "4")]);
    assert_eq!(
        resolve(Some(shard(3, 8)), None, &e).unwrap(),
        (shard(3, 8), ShardSource::Flag)
    );
}

#[test]
fn kubernetes_index_needs_a_count() {
    let e = env(&[("JOB_COMPLETION_INDEX", "2")]);
    let err = resolve(None, None, &e).unwrap_err().to_string();
    assert!(
        err.contains("--shard-count") && err.contains("SDCAP_SHARD_COUNT"),
        "{err}"
    );
    assert_eq!(
        resolve(None, Some(3), &e).unwrap(),
        (shard(2, 3), ShardSource::Kubernetes)
    );
    let e = env(&[("JOB_COMPLETION_INDEX", "2"), ("SDCAP_SHARD_COUNT", "4")]);
    assert_eq!(resolve(None, None, &e).unwrap().0, shard(2, 4));
    let e = env(&[("JOB_COMPLETION_INDEX", "4"), ("SDCAP_SHARD_COUNT", "4")]);
    assert!(resolve(None, None, &e).is_err(), "index beyond the count");
}

#[test]
fn slurm_arrays_starting_anywhere() {
    let e = env(&[
        ("SLURM_ARRAY_TASK_ID", "1"),
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
    ]);
    assert_eq!(
        resolve(None, None, &e).unwrap(),
        (shard(0, 3), ShardSource::Slurm)
    );
    let e = env(&[
        ("SLURM_ARRAY_TASK_ID", "2"),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
    ]);
    assert_eq!(
        resolve(None, None, &e).unwrap().0,
        shard(2, 3),
        "MIN 0 when absent"
    );
    // --array=10-30:10 → ids 10, 20, 30.
    let e = env(&[
        ("SLURM_ARRAY_TASK_ID", "30"),
        ("SLURM_ARRAY_TASK_MIN", "10"),
        ("SLURM_ARRAY_TASK_STEP", "10"),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
    ]);
    assert_eq!(resolve(None, None, &e).unwrap().0, shard(2, 3));
    let e = env(&[("SLURM_ARRAY_TASK_ID", "2")]);
    assert!(resolve(None, None, &e).is_err(), "no count");
    let e = env(&[
        ("SLURM_ARRAY_TASK_ID", "x"),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
    ]);
    assert!(resolve(None, None, &e).is_err(), "not a number");
}

#[test]
fn kubernetes_before_slurm_and_whole_by_default() {
    let e = env(&[
        ("JOB_COMPLETION_INDEX", "0"),
        ("SDCAP_SHARD_COUNT", "2"),
        ("SLURM_ARRAY_TASK_ID", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "2"),
    ]);
    assert_eq!(resolve(None, None, &e).unwrap().1, ShardSource::Kubernetes);
    let none = env(&[]);
    assert_eq!(
        resolve(None, None, &none).unwrap(),
        (Shard::WHOLE, ShardSource::Whole)
    );
    assert!(
        resolve(None, Some(2), &none).is_err(),
        "a count alone says nothing"
    );
}
