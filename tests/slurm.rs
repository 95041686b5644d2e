//! `probunet sweep --emit slurm` for real: a one-node Slurm cluster on localhost (munge,
//! slurmctld, slurmd from Debian's packages, installed here when missing), the emitted
//! job array submitted with sbatch, and the summary collected from what the array tasks
//! wrote. The test skips itself, loudly, only where the packages cannot be installed.
mod common;
use common::{loud, run_ok, text};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BINARIES: [&str; 6] = [
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "scontrol",
];
const PACKAGES: [&str; 4] = ["munge", "slurmctld", "slurmd", "slurm-client"];

/// How often to ask the cluster (sinfo, squeue) while waiting on it: each look starts a
/// client that queries slurmctld, so less often than a look at a file, which leaves the
/// cores to the trials while still noticing within a tenth of a second.
const CLIENT_POLL: Duration = Duration::from_millis(100);

/// The daemons live in /usr/sbin, which a CI runner's PATH may lack: add the sbin folders
/// to this process's PATH, so both the checks and the spawned commands find them.
fn with_sbin_on_path() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    for sbin in ["/usr/sbin", "/sbin", "/usr/local/sbin"] {
        if !dirs.iter().any(|d| d == Path::new(sbin)) {
            dirs.push(PathBuf::from(sbin));
        }
    }
    std::env::set_var(
        "PATH",
        std::env::join_paths(dirs).expect("valid PATH entries"),
    );
}

fn skip(why: &str) {
    // Straight to the process's stderr, past the test harness's capture, so that the
    // skip shows in every log, passing or not.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n========================================================================\n\
         SKIPPED tests/slurm.rs: {why}\n\
         The Slurm end-to-end test needs Debian's {} packages (installed as root with\n\
         apt-get when missing).\n\
         ========================================================================\n",
        PACKAGES.join(", ")
    );
}

/// Installs the packages with apt-get when a binary is missing; `Err` says why that
/// cannot be done here.
fn ensure_slurm() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "not root: the packages cannot be installed, nor slurmd run, by this user \
                    (CI runs the suite as root)"
                .into(),
        );
    }
    common::ensure_packages(&PACKAGES, &BINARIES)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private munged, slurmctld and slurmd; dropping it stops them.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}\n{}",
            text(&out),
            self.logs()
        );
        out
    }

    fn start(dir: &Path) -> Cluster {
        let dir = dir.to_path_buf();
        for sub in ["munge", "state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("munge"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        let key = dir.join("munge/munge.key");
        let mut bytes = vec![0u8; 1024];
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut bytes)
            .unwrap();
        std::fs::write(&key, bytes).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let socket = dir.join("munge/munge.sock");
        let conf = dir.join("slurm.conf");
        let cluster = Cluster {
            dir: dir.clone(),
            conf: conf.clone(),
        };
        let p = |name: &str| dir.join(name).display().to_string();
        let out = Command::new("munged")
            .arg("--force")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--pid-file={}", p("munge/munged.pid")))
            .arg(format!("--seed-file={}", p("munge/munged.seed")))
            .arg(format!("--log-file={}", p("log/munged.log")))
            .output()
            .expect("munged runs");
        assert!(out.status.success(), "munged: {}", text(&out));

        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (ctld_port, d_port) = (free_port(), free_port());
        let config = format!(
            "ClusterName=probunet-test\n\
             SlurmctldHost=localhost\n\
             SlurmctldPort={ctld_port}\n\
             SlurmdPort={d_port}\n\
             AuthType=auth/munge\n\
             AuthInfo=socket={socket}\n\
             CredType=cred/munge\n\
             SlurmUser=root\n\
             SlurmdUser=root\n\
             StateSaveLocation={state}\n\
             SlurmdSpoolDir={spool}\n\
             SlurmctldPidFile={ctld_pid}\n\
             SlurmdPidFile={d_pid}\n\
             SlurmctldLogFile={ctld_log}\n\
             SlurmdLogFile={d_log}\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             MpiDefault=none\n\
             SchedulerType=sched/backfill\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\n\
             ReturnToService=2\n\
             NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN\n\
             PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n",
            socket = socket.display(),
            state = p("state"),
            spool = p("spool"),
            ctld_pid = p("slurmctld.pid"),
            d_pid = p("slurmd.pid"),
            ctld_log = p("log/slurmctld.log"),
            d_log = p("log/slurmd.log"),
        );
        std::fs::write(&conf, config).unwrap();
        let conf_text = conf.display().to_string();
        cluster.run("slurmctld", &["-f", &conf_text]);
        cluster.run("slurmd", &["-f", &conf_text, "-N", "localhost"]);
        let mut state = String::new();
        let idle = common::poll(CLIENT_POLL, || {
            let out = cluster.command("sinfo").args(["-h", "-o", "%t"]).output();
            state = out.map(|o| text(&o)).unwrap_or_default();
            (state.trim() == "idle").then_some(())
        });
        assert!(
            idle.is_some(),
            "the node never became idle (sinfo: {state})\n{}",
            cluster.logs()
        );
        cluster
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for log in ["log/slurmctld.log", "log/slurmd.log", "log/munged.log"] {
            let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            out.push_str(&format!("--- {log} (last lines)\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn pid(&self, file: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .command("scontrol")
            .arg("shutdown")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Stop exactly the daemons this test started, by their pid files: scontrol
        // shutdown stops slurmctld and slurmd, SIGTERM whatever is left.
        let alive = |pid: i32| unsafe { libc::kill(pid, 0) } == 0;
        for file in ["slurmd.pid", "slurmctld.pid", "munge/munged.pid"] {
            let Some(pid) = self.pid(file) else { continue };
            let start = Instant::now();
            let mut signal = if file.starts_with("munge") {
                Some(libc::SIGTERM)
            } else {
                None
            };
            while alive(pid) && start.elapsed() < Duration::from_secs(15) {
                if start.elapsed() > Duration::from_secs(5) {
                    signal.get_or_insert(libc::SIGTERM);
                }
                if let Some(sig) = signal.take() {
                    // SAFETY: kill(2) on a pid read from our own daemon's pid file.
                    unsafe { libc::kill(pid, sig) };
                }
                std::thread::sleep(common::POLL);
            }
        }
    }
}

#[test]
fn a_job_array_runs_the_sweep_on_a_one_node_slurm_cluster() {
    with_sbin_on_path();
    let start = Instant::now();
    if let Err(why) = ensure_slurm() {
        skip(&why);
        return;
    }
    let installed = start.elapsed();
    let scratch = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&scratch.path().join("cluster"));
    let started = start.elapsed();

    let work = scratch.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(
        work.join("tiny.toml"),
        common::tiny_spec(20, 10, "images = false\n"),
    )
    .unwrap();
    std::fs::write(
        work.join("sweep.toml"),
        "[sweep]\nname = \"slurm\"\nbase = \"tiny.toml\"\n\
         [sweep.grid]\nbeta = [0.5, 2]\nlatent_dim = [2, 4]\n\
         [sweep.slurm]\ncpus = 1\nmem = \"300M\"\ntime = \"00:05:00\"\nconcurrency = 2\n",
    )
    .unwrap();
    let out = run_ok(&work, &["sweep", "sweep.toml", "--emit", "slurm"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("4 of 4 trials as a job array"),
        "{}",
        text(&out)
    );
    let script = work.join("runs/slurm/sweep.sbatch");
    let script_text = std::fs::read_to_string(&script).unwrap();
    assert!(
        script_text.contains("#SBATCH --array=0-3%2\n"),
        "{script_text}"
    );
    assert!(!script_text.contains("--gres"), "{script_text}");

    let out = cluster
        .command("sbatch")
        .current_dir(&work)
        .args(["--parsable", script.to_str().unwrap()])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sbatch: {}\n{}",
        text(&out),
        cluster.logs()
    );
    let job = String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    eprintln!("submitted job array {job}");

    // Wait until the array has left the queue.
    let submitted = Instant::now();
    let mut seen_two_running = false;
    let mut queue = String::new();
    let left = common::poll(CLIENT_POLL, || {
        let out = cluster
            .command("squeue")
            .args(["-h", "-j", &job, "-o", "%i %t"])
            .output()
            .unwrap();
        queue = common::stdout(&out);
        let running = queue.lines().filter(|l| l.ends_with(" R")).count();
        seen_two_running |= running == 2;
        (out.status.success() && queue.trim().is_empty()).then_some(())
    });
    assert!(
        left.is_some(),
        "job {job} still queued after {} s:\n{queue}\n{}",
        common::TIMEOUT.as_secs(),
        cluster.logs()
    );
    let ran = submitted.elapsed();

    let folder = work.join("runs/slurm");
    let logs: Vec<PathBuf> = std::fs::read_dir(folder.join("slurm"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(logs.len(), 4, "one log per array task: {logs:?}");
    let out = run_ok(&work, &["sweep", "runs/slurm", "--collect"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut task_logs = String::new();
    for log in &logs {
        task_logs.push_str(&format!(
            "--- {}\n{}\n",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        ));
    }
    assert!(
        stdout.contains("sweep slurm: 4 trials: 4 finished\nbest: "),
        "{stdout}\n{task_logs}\n{}",
        cluster.logs()
    );
    let rows = common::sweep_summary(&folder);
    assert_eq!(rows.len(), 4);
    for row in &rows {
        assert_eq!(row["status"], "finished", "{row:?}");
        assert_eq!(row["steps"], "20", "{row:?}");
    }
    // Each task ran its own trial, with the thread count Slurm gave it.
    let mut trials: Vec<usize> = logs
        .iter()
        .map(|log| {
            let text = std::fs::read_to_string(log).unwrap();
            let line = text
                .lines()
                .find(|l| l.starts_with("trial ") && l.contains(" finished: 20 steps"))
                .unwrap_or_else(|| panic!("{}:\n{text}", log.display()));
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        })
        .collect();
    trials.sort();
    assert_eq!(trials, [0, 1, 2, 3]);
    for row in &rows {
        let status = common::read_json(&folder.join(&row["id"]).join("status.json"));
        assert_eq!(status["threads"], 1, "{status}");
        assert_eq!(status["device"], "cpu", "{status}");
    }
    loud(&format!(
        "slurm test: packages {:.1} s, cluster up {:.1} s, 4 trials {:.1} s ({}), total {:.1} s",
        installed.as_secs_f64(),
        (started - installed).as_secs_f64(),
        ran.as_secs_f64(),
        if seen_two_running {
            "2 seen running at once"
        } else {
            "never 2 seen at once"
        },
        start.elapsed().as_secs_f64()
    ));
    drop(cluster);
}
