//! Reads what `EventWriter` writes back with TensorBoard's own
//! `EventAccumulator` (through `scripts/read_events.py`), so that the files are
//! checked against the real reader rather than our own understanding of it.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use probunet::tensorboard::{
    EventWriter, HParamDomain, HParamSpec, HParamValue, Image, SessionStatus,
};
use serde_json::{json, Value};

mod common;
use common::{events_at, read_events};

/// `(step, value)` pairs of a scalar tag, values as the `f32` TensorBoard keeps.
fn scalars(run: &Value, tag: &str) -> Vec<(i64, f32)> {
    common::scalars(run, tag)
        .into_iter()
        .map(|(step, value)| (i64::try_from(step).unwrap(), value as f32))
        .collect()
}

fn keys(object: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = object
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
}

fn train_loss(step: i64) -> f32 {
    1.0 / (step as f32 + 1.0)
}

#[test]
fn scalars_images_and_hparams_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = tmp.path().join("sweep");
    let trial = sweep.join("trial_0");

    let mut root = EventWriter::create(&sweep).unwrap();
    root.add_hparams_experiment(
        &[
            HParamSpec {
                name: "learning_rate".into(),
                domain: HParamDomain::Float64Interval {
                    min: 1e-5,
                    max: 1e-3,
                },
            },
            HParamSpec {
                name: "latent_dim".into(),
                domain: HParamDomain::Float64Values(vec![3.0, 6.0]),
            },
            HParamSpec {
                name: "kl".into(),
                domain: HParamDomain::StringValues(vec!["analytic".into(), "sampled".into()]),
            },
            HParamSpec {
                name: "use_bn".into(),
                domain: HParamDomain::Bool,
            },
        ],
        &["val_loss", "val_ged"],
    )
    .unwrap();
    root.close().unwrap();

    let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut writer = EventWriter::create(&trial).unwrap();
    let hparams = [
        ("learning_rate".to_owned(), HParamValue::from(1e-4)),
        ("latent_dim".to_owned(), HParamValue::from(6usize)),
        ("kl".to_owned(), HParamValue::from("analytic")),
        ("use_bn".to_owned(), HParamValue::from(true)),
    ];
    writer
        .add_hparams_session_start(&hparams, "lr1e-4", start)
        .unwrap();
    for step in 0..5 {
        writer
            .add_scalar("train_loss", train_loss(step), step)
            .unwrap();
        writer
            .add_scalars(step, &[("train_kl", step as f64 * 0.5), ("beta", 2.0)])
            .unwrap();
    }
    let grey = Image::grey(18, 58, (0..18 * 58).map(|i| (i % 256) as u8).collect()).unwrap();
    writer.add_image("val/samples", 4, &grey).unwrap();
    let rgb = Image::rgb(3, 5, (0..45).collect()).unwrap();
    writer.add_image("val/rgb", 4, &rgb).unwrap();
    writer
        .add_hparams_session_end(SessionStatus::Success, start + Duration::from_secs(3600))
        .unwrap();
    writer.close().unwrap();

    let events = read_events(&[&sweep, &trial]);
    let trial_run = events_at(&events, &trial);
    assert_eq!(trial_run["file_version"], json!(2.0));
    assert_eq!(
        keys(&trial_run["scalars"]),
        ["beta", "train_kl", "train_loss"]
    );
    let expected: Vec<(i64, f32)> = (0..5).map(|s| (s, train_loss(s))).collect();
    assert_eq!(scalars(trial_run, "train_loss"), expected);
    let expected: Vec<(i64, f32)> = (0..5).map(|s| (s, s as f32 * 0.5)).collect();
    assert_eq!(scalars(trial_run, "train_kl"), expected);
    let expected: Vec<(i64, f32)> = (0..5).map(|s| (s, 2.0)).collect();
    assert_eq!(scalars(trial_run, "beta"), expected);

    // A 2x6 grid of 8x8 tiles with 2-pixel separators: 18 high, 58 wide.
    assert_eq!(
        trial_run["images"],
        json!({
            "val/samples": [{"step": 4, "width": 58, "height": 18,
                             "png_width": 58, "png_height": 18, "png_color_type": 0}],
            "val/rgb": [{"step": 4, "width": 5, "height": 3,
                         "png_width": 5, "png_height": 3, "png_color_type": 2}],
        })
    );

    assert_eq!(
        trial_run["tensors"],
        json!({"_hparams_/session_start_info": [0], "_hparams_/session_end_info": [0]})
    );
    assert_eq!(
        trial_run["hparams"],
        json!({
            "_hparams_/session_start_info": {
                "hparams": {
                    "learning_rate": 1e-4,
                    "latent_dim": 6.0,
                    "kl": "analytic",
                    "use_bn": true,
                },
                "group_name": "lr1e-4",
                "start_time_secs": 1_700_000_000.0,
            },
            "_hparams_/session_end_info": {
                "status": "STATUS_SUCCESS",
                "end_time_secs": 1_700_003_600.0,
            },
        })
    );

    // The sweep folder's own file holds the experiment; the accumulator for a
    // folder does not descend into the trial's subfolder.
    let sweep_run = events_at(&events, &sweep);
    let experiment = &sweep_run["hparams"]["_hparams_/experiment"];
    assert!(experiment["time_created_secs"].as_f64().unwrap() > 1.7e9);
    assert_eq!(
        experiment["hparam_infos"],
        json!([
            {"name": "learning_rate", "type": "DATA_TYPE_FLOAT64",
             "domain_interval": {"min_value": 1e-5, "max_value": 1e-3}},
            {"name": "latent_dim", "type": "DATA_TYPE_FLOAT64",
             "domain_discrete": [3.0, 6.0]},
            {"name": "kl", "type": "DATA_TYPE_STRING",
             "domain_discrete": ["analytic", "sampled"]},
            {"name": "use_bn", "type": "DATA_TYPE_BOOL",
             "domain_discrete": [false, true]},
        ])
    );
    assert_eq!(
        experiment["metric_infos"],
        json!([{"name": {"tag": "val_loss"}}, {"name": {"tag": "val_ged"}}])
    );
}

/// The seconds field of an event file name.
fn name_secs(path: &Path) -> &str {
    path.file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .split('.')
        .nth(3)
        .unwrap()
}

#[test]
fn two_writers_in_one_folder_and_second_both_survive() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("two_writers");
    // Retry in the unlikely case the two creations straddle a second boundary,
    // so that the test really covers two writers in the same second.
    let (mut a, mut b) = loop {
        let a = EventWriter::create(&dir).unwrap();
        let b = EventWriter::create(&dir).unwrap();
        if name_secs(a.path()) == name_secs(b.path()) {
            break (a, b);
        }
        drop((a, b));
        fs::remove_dir_all(&dir).unwrap();
    };
    assert_ne!(a.path(), b.path());
    for step in 0..3 {
        a.add_scalar("a/loss", step as f32, step).unwrap();
        b.add_scalar("b/loss", 10.0 + step as f32, step).unwrap();
        a.add_scalar("val_loss", 0.5, step).unwrap();
        b.add_scalar("val_loss", 0.25, 10 + step).unwrap();
    }
    let (a_path, b_path) = (a.path().to_owned(), b.path().to_owned());
    a.close().unwrap();
    drop(b);

    assert_eq!(event_files(&dir), {
        let mut both = vec![a_path.clone(), b_path.clone()];
        both.sort();
        both
    });
    let events = read_events(&[&dir, &a_path, &b_path]);
    let folder = events_at(&events, &dir);
    assert_eq!(scalars(folder, "a/loss"), [(0, 0.0), (1, 1.0), (2, 2.0)]);
    assert_eq!(scalars(folder, "b/loss"), [(0, 10.0), (1, 11.0), (2, 12.0)]);
    let mut val = scalars(folder, "val_loss");
    val.sort_by_key(|&(step, _)| step);
    assert_eq!(
        val,
        [
            (0, 0.5),
            (1, 0.5),
            (2, 0.5),
            (10, 0.25),
            (11, 0.25),
            (12, 0.25)
        ]
    );
    assert_eq!(
        keys(&events_at(&events, &a_path)["scalars"]),
        ["a/loss", "val_loss"]
    );
    assert_eq!(
        keys(&events_at(&events, &b_path)["scalars"]),
        ["b/loss", "val_loss"]
    );
}

#[test]
fn truncated_last_record_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("truncated");
    let mut writer = EventWriter::create(dir.join("whole")).unwrap();
    for step in 0..5 {
        writer
            .add_scalar("train_loss", train_loss(step), step)
            .unwrap();
    }
    writer.flush().unwrap();
    let path = writer.path().to_owned();
    let complete = fs::metadata(&path).unwrap().len() as usize;
    writer.add_scalar("train_loss", train_loss(5), 5).unwrap();
    writer.close().unwrap();
    let bytes = fs::read(&path).unwrap();
    let name = path.file_name().unwrap();

    // Cut the last record inside its length, its length CRC, its payload and
    // its payload CRC: TensorBoard must keep everything before it each time.
    let cuts = [
        ("in_length", complete + 3),
        ("in_length_crc", complete + 10),
        (
            "in_payload",
            complete + 12 + (bytes.len() - complete - 16) / 2,
        ),
        ("in_payload_crc", bytes.len() - 2),
    ];
    let runs: Vec<PathBuf> = cuts
        .iter()
        .map(|(label, cut)| {
            let run_dir = dir.join(label);
            fs::create_dir_all(&run_dir).unwrap();
            fs::write(run_dir.join(name), &bytes[..*cut]).unwrap();
            run_dir
        })
        .collect();
    let mut paths: Vec<&Path> = runs.iter().map(PathBuf::as_path).collect();
    paths.push(path.parent().unwrap());
    let events = read_events(&paths);

    let before: Vec<(i64, f32)> = (0..5).map(|s| (s, train_loss(s))).collect();
    for run_dir in &runs {
        assert_eq!(
            scalars(events_at(&events, run_dir), "train_loss"),
            before,
            "{}",
            run_dir.display()
        );
    }
    let all: Vec<(i64, f32)> = (0..6).map(|s| (s, train_loss(s))).collect();
    assert_eq!(
        scalars(events_at(&events, path.parent().unwrap()), "train_loss"),
        all
    );
}
