//! `probunet sweep --emit slurm`: an sbatch job-array script with one array task per
//! trial, each running `probunet train --sweep <folder> --trial $SLURM_ARRAY_TASK_ID`.
use super::plan::Plan;
use super::spec::SlurmOptions;
use super::SweepError;
use crate::run::RunError;
use std::path::Path;

/// CPU cores per trial when neither the spec nor a flag says.
pub const DEFAULT_CPUS: u32 = 2;
/// Trials at once when neither the spec nor a flag says.
pub const DEFAULT_CONCURRENCY: u32 = 4;
/// Seconds before the time limit at which Slurm sends the trial a Ctrl-C, so that it
/// checkpoints; submitting the script again resumes it.
pub const GRACE_S: u32 = 120;
/// The folder in the sweep folder that holds the array tasks' logs.
pub const LOG_DIR: &str = "slurm";

/// `options` over `defaults`, field by field.
pub fn merge(defaults: &SlurmOptions, options: &SlurmOptions) -> SlurmOptions {
    SlurmOptions {
        partition: options.partition.clone().or(defaults.partition.clone()),
        account: options.account.clone().or(defaults.account.clone()),
        gpus: options.gpus.or(defaults.gpus),
        cpus: options.cpus.or(defaults.cpus),
        mem: options.mem.clone().or(defaults.mem.clone()),
        time: options.time.clone().or(defaults.time.clone()),
        concurrency: options.concurrency.or(defaults.concurrency),
        extra: defaults
            .extra
            .iter()
            .chain(&options.extra)
            .cloned()
            .collect(),
    }
}

/// Checks each option's form, naming the option and the value.
pub fn check(options: &SlurmOptions) -> Result<(), String> {
    let name_like = |v: &str| {
        !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.,-".contains(c))
    };
    if let Some(p) = options.partition.as_deref().filter(|p| !name_like(p)) {
        return Err(format!(
            "partition {p:?}: expected a partition name (letters, digits, '_', '.', '-', ',')"
        ));
    }
    if let Some(a) = options.account.as_deref().filter(|a| !name_like(a)) {
        return Err(format!(
            "account {a:?}: expected an account name (letters, digits, '_', '.', '-')"
        ));
    }
    if let Some(gpus) = options.gpus.filter(|&g| g > 1) {
        return Err(format!(
            "gpus: a trial trains on one device, so 0 (the CPU) or 1, got {gpus}; more \
             trials at once is `concurrency`"
        ));
    }
    if options.cpus == Some(0) {
        return Err("cpus: must be at least 1, got 0".into());
    }
    if options.concurrency == Some(0) {
        return Err("concurrency: must be at least 1, got 0".into());
    }
    if let Some(mem) = &options.mem {
        let digits = mem.trim_end_matches(['K', 'M', 'G', 'T']);
        if digits.is_empty()
            || !digits.chars().all(|c| c.is_ascii_digit())
            || mem.len() > digits.len() + 1
        {
            return Err(format!("mem {mem:?}: expected a size such as 4000M or 16G"));
        }
    }
    if let Some(time) = &options.time {
        let ok = time.eq_ignore_ascii_case("infinite")
            || time.eq_ignore_ascii_case("unlimited")
            || (time.starts_with(|c: char| c.is_ascii_digit())
                && time
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == ':' || c == '-')
                && !time.ends_with([':', '-']));
        if !ok {
            return Err(format!(
                "time {time:?}: expected a Slurm time limit such as 90, 02:00:00 or 1-12:00:00"
            ));
        }
    }
    for extra in &options.extra {
        if !extra.starts_with("--") || extra.contains(['\n', '\r']) {
            return Err(format!(
                "extra {extra:?}: expected one sbatch option such as --qos=long"
            ));
        }
    }
    Ok(())
}

/// `0-3,5,7-9`: the indices as ranges.
pub fn array_ranges(indices: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let mut j = i;
        while j + 1 < indices.len() && indices[j + 1] == indices[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            indices[i].to_string()
        } else {
            format!("{}-{}", indices[i], indices[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// `text` quoted for a POSIX shell.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The sbatch script that runs `indices` of the sweep in `folder` (absolute paths),
/// with `exe` the probunet executable and `workdir` the folder trials run in.
pub fn script(
    plan: &Plan,
    folder: &Path,
    workdir: &Path,
    exe: &Path,
    indices: &[usize],
    options: &SlurmOptions,
) -> Result<String, SweepError> {
    if indices.is_empty() {
        return Err(SweepError::Other("no trials to put in the script".into()));
    }
    check_directive_paths(folder, workdir)?;
    let job = ArrayJob {
        plan,
        folder: folder.display().to_string(),
        workdir,
        indices,
        options,
        cpus: options.cpus.unwrap_or(DEFAULT_CPUS),
        concurrency: options.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
        gpus: options.gpus.unwrap_or(0),
    };
    let mut out = job.header();
    out.push_str(&job.directives());
    out.push_str(&job.command(exe));
    Ok(out)
}

/// The directives are read by sbatch, not a shell: paths with spaces or quotes would
/// be misread there.
fn check_directive_paths(folder: &Path, workdir: &Path) -> Result<(), SweepError> {
    for path in [folder, workdir] {
        let text = path.display().to_string();
        if text
            .chars()
            .any(|c| c.is_whitespace() || "'\"\\#".contains(c))
        {
            return Err(SweepError::Other(format!(
                "{text}: a path with spaces, quotes or '#' cannot go into #SBATCH lines; \
                 run the sweep from a simpler path"
            )));
        }
    }
    Ok(())
}

/// One script's job array, with the options' defaults filled in.
struct ArrayJob<'a> {
    plan: &'a Plan,
    /// The sweep folder as the script writes it.
    folder: String,
    workdir: &'a Path,
    indices: &'a [usize],
    options: &'a SlurmOptions,
    cpus: u32,
    concurrency: u32,
    gpus: u32,
}

/// The line that marks a script as this module's, so `--out` replaces only such scripts.
const WRITTEN_BY: &str = "Written by `probunet sweep --emit slurm`.";

/// Refuses to replace a file at `path` that is not a script `--emit slurm` wrote.
pub fn check_replaceable(path: &Path) -> Result<(), SweepError> {
    let mut head = Vec::new();
    match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(RunError::io(path, e).into()),
        Ok(file) => {
            use std::io::Read;
            file.take(1024)
                .read_to_end(&mut head)
                .map_err(|e| RunError::io(path, e))?;
        }
    }
    if String::from_utf8_lossy(&head).contains(WRITTEN_BY) {
        return Ok(());
    }
    Err(SweepError::Folder {
        path: path.to_path_buf(),
        why: "exists and is not a script `probunet sweep --emit slurm` wrote; choose another \
              --out or move it"
            .into(),
    })
}

impl ArrayJob<'_> {
    /// The shebang and a comment on what the script runs and how to submit it again.
    fn header(&self) -> String {
        let (concurrency, folder_text) = (self.concurrency, &self.folder);
        format!(
            "#!/bin/bash\n\
             # Sweep `{}`: {} of its {} trials as one Slurm job array, one trial per task,\n\
             # at most {concurrency} at once. {WRITTEN_BY}\n\
             #   submit:  sbatch {folder_text}/sweep.sbatch\n\
             #   results: probunet sweep {folder_text} --collect\n\
             # A task that hits its time limit is sent Ctrl-C {GRACE_S} s before it and checkpoints;\n\
             # submitting the script again resumes unfinished trials and skips finished ones.\n",
            self.plan.name,
            self.indices.len(),
            self.plan.trials.len(),
        )
    }

    /// The `#SBATCH` lines: the array, its logs and each trial's resources.
    fn directives(&self) -> String {
        let options = self.options;
        let mut out = String::new();
        let mut directive = |line: String| out.push_str(&format!("#SBATCH {line}\n"));
        directive(format!("--job-name=probunet-{}", self.plan.name));
        directive(format!(
            "--array={}%{}",
            array_ranges(self.indices),
            self.concurrency
        ));
        directive(format!("--chdir={}", self.workdir.display()));
        directive(format!("--output={}/{LOG_DIR}/%A_%a.log", self.folder));
        directive("--ntasks=1".into());
        directive(format!("--cpus-per-task={}", self.cpus));
        if self.gpus > 0 {
            directive(format!("--gres=gpu:{}", self.gpus));
        }
        if let Some(mem) = &options.mem {
            directive(format!("--mem={mem}"));
        }
        if let Some(time) = &options.time {
            directive(format!("--time={time}"));
        }
        if let Some(partition) = &options.partition {
            directive(format!("--partition={partition}"));
        }
        if let Some(account) = &options.account {
            directive(format!("--account={account}"));
        }
        directive(format!("--signal=B:INT@{GRACE_S}"));
        for extra in &options.extra {
            directive(extra.clone());
        }
        out
    }

    /// The task's command: the trial of this array index, with the threads Slurm gave it.
    fn command(&self, exe: &Path) -> String {
        let cpus = self.cpus;
        let device = if self.gpus > 0 { "cuda" } else { "cpu" };
        format!(
            "\nset -eu\n\
             export OMP_NUM_THREADS=\"${{SLURM_CPUS_PER_TASK:-{cpus}}}\"\n\
             export MKL_NUM_THREADS=\"$OMP_NUM_THREADS\"\n\
             # exec, so that Slurm's signal reaches probunet itself.\n\
             exec {} train --sweep {} --trial \"$SLURM_ARRAY_TASK_ID\" --plain \\\n    \
             --threads \"$OMP_NUM_THREADS\" --device {device}\n",
            quote(&exe.display().to_string()),
            quote(&self.folder),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_compress_into_ranges() {
        assert_eq!(array_ranges(&[0, 1, 2, 3]), "0-3");
        assert_eq!(array_ranges(&[0, 2, 3, 4, 7, 9, 10]), "0,2-4,7,9-10");
        assert_eq!(array_ranges(&[5]), "5");
    }

    #[test]
    fn options_are_checked_and_merged() {
        let spec = SlurmOptions {
            gpus: Some(1),
            mem: Some("16G".into()),
            extra: vec!["--qos=long".into()],
            ..Default::default()
        };
        let flags = SlurmOptions {
            mem: Some("8G".into()),
            time: Some("01:00:00".into()),
            ..Default::default()
        };
        let merged = merge(&spec, &flags);
        assert_eq!(merged.gpus, Some(1));
        assert_eq!(merged.mem.as_deref(), Some("8G"));
        assert_eq!(merged.time.as_deref(), Some("01:00:00"));
        assert!(check(&merged).is_ok());
        for (options, message) in [
            (
                SlurmOptions {
                    mem: Some("lots".into()),
                    ..Default::default()
                },
                "mem \"lots\": expected a size",
            ),
            (
                SlurmOptions {
                    time: Some("2h".into()),
                    ..Default::default()
                },
                "time \"2h\": expected a Slurm time limit",
            ),
            (
                SlurmOptions {
                    partition: Some("gpu; rm".into()),
                    ..Default::default()
                },
                "partition \"gpu; rm\"",
            ),
            (
                SlurmOptions {
                    concurrency: Some(0),
                    ..Default::default()
                },
                "concurrency: must be at least 1",
            ),
            (
                SlurmOptions {
                    gpus: Some(100000),
                    ..Default::default()
                },
                "gpus: a trial trains on one device, so 0 (the CPU) or 1, got 100000",
            ),
            (
                SlurmOptions {
                    extra: vec!["qos=long".into()],
                    ..Default::default()
                },
                "extra \"qos=long\"",
            ),
        ] {
            let err = check(&options).unwrap_err();
            assert!(err.starts_with(message), "{err}");
        }
        for time in ["90", "02:00:00", "1-12:00:00", "infinite"] {
            let options = SlurmOptions {
                time: Some(time.into()),
                ..Default::default()
            };
            assert!(check(&options).is_ok(), "{time}");
        }
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("/a b/it's"), r"'/a b/it'\''s'");
    }
}
