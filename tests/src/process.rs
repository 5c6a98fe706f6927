//! Child processes that never outlive the process that started them.
//!
//! Rust never drops statics, so the shared test environment cannot rely on `Drop`, and
//! `PR_SET_PDEATHSIG` fires when the spawning *thread* exits (test threads do). Instead each
//! environment starts a reaper: a tiny shell in its own process group that reads the process
//! group ids of the environment's children (and `run <script>` lines: cleanup scripts) from a
//! pipe. The parent holds the pipe's write end until it exits — however it exits, even
//! SIGKILL — and the kernel then closes it: the reaper reads EOF, terminates every group
//! (SIGTERM, then SIGKILL), runs the cleanup scripts, and removes the environment's directory.
//!
//! A [`Supervisor`] holds an environment's processes and starts the supervised ones again when
//! they exit on their own, with a kubelet's CrashLoopBackOff ([`CrashLoop`]), recording each exit.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use std::os::unix::process::CommandExt;

const REAPER_SCRIPT: &str = r#"
trap '' INT TERM HUP
dir="$1"
groups=""
scripts=""
while read -r word arg; do
  if [ "$word" = run ]; then scripts="$scripts $arg"; else groups="$groups $word"; fi
done
for g in $groups; do kill -s TERM -- "-$g" 2>/dev/null; done
i=0
while [ "$i" -lt 30 ]; do
  alive=""
  for g in $groups; do kill -s 0 -- "-$g" 2>/dev/null && alive=1; done
  [ -z "$alive" ] && break
  sleep 0.1
  i=$((i + 1))
done
for g in $groups; do kill -s KILL -- "-$g" 2>/dev/null; done
for s in $scripts; do /bin/sh "$s" >/dev/null 2>&1; done
[ -n "$dir" ] && rm -rf -- "$dir"
exit 0
"#;

/// Kills the registered process groups, and removes a directory, when the parent goes away.
pub struct Reaper {
    pipe: Mutex<Option<ChildStdin>>,
    shell: Mutex<Child>,
}

impl Reaper {
    /// Start a reaper; `remove` is the directory to delete after the children are gone.
    pub fn start(remove: Option<&Path>) -> Result<Reaper> {
        let mut shell = Command::new("/bin/sh")
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("gpumarket-env-reaper")
            .arg(remove.map(Path::as_os_str).unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group: a Ctrl-C at the terminal must not kill it before the children.
            .process_group(0)
            .spawn()
            .context("starting the reaper shell (/bin/sh)")?;
        let pipe = shell.stdin.take().context("reaper stdin")?;
        Ok(Reaper { pipe: Mutex::new(Some(pipe)), shell: Mutex::new(shell) })
    }

    fn watch(&self, group: u32) -> Result<()> {
        self.send(&group.to_string()).context("registering a child with the reaper")
    }

    /// Run the shell script at `script` (a path without spaces) once the processes are gone,
    /// before the directory is removed.
    pub fn run_at_end(&self, script: &Path) -> Result<()> {
        let script = script.to_str().context("cleanup script path is not UTF-8")?;
        if script.contains(char::is_whitespace) {
            bail!("cleanup script path {script:?} has whitespace");
        }
        self.send(&format!("run {script}")).context("registering a cleanup script with the reaper")
    }

    fn send(&self, line: &str) -> Result<()> {
        let mut pipe = self.pipe.lock().map_err(|_| anyhow!("reaper lock poisoned"))?;
        let pipe = pipe.as_mut().context("the environment is shutting down")?;
        writeln!(pipe, "{line}")?;
        Ok(())
    }

    /// Let the reaper do its work now (instead of at process exit) and wait for it.
    pub fn finish(&self) -> Result<()> {
        drop(self.pipe.lock().map_err(|_| anyhow!("reaper lock poisoned"))?.take());
        self.shell.lock().map_err(|_| anyhow!("reaper lock poisoned"))?.wait()?;
        Ok(())
    }
}

/// A named child process in its own process group, stdout and stderr in `logs/<name>.log`.
pub struct Process {
    name: String,
    log: PathBuf,
    run: Mutex<Run>,
    /// How it was started, to start it again.
    command: Mutex<Command>,
    /// Started again by [`Supervisor`] when it exits on its own.
    supervised: bool,
}

/// The current child of a [`Process`], and its crash loop when supervised.
struct Run {
    child: Child,
    started: Instant,
    crash_loop: CrashLoop,
    /// It exited on its own and starts again then.
    restart_at: Option<Instant>,
}

impl Process {
    pub fn spawn(reaper: &Reaper, logs: &Path, name: &str, mut command: Command) -> Result<Self> {
        let log = logs.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = start(reaper, name, &mut command, out)?;
        Ok(Process {
            name: name.to_string(),
            log,
            run: Mutex::new(Run {
                child,
                started: Instant::now(),
                crash_loop: CrashLoop::default(),
                restart_at: None,
            }),
            command: Mutex::new(command),
            supervised: false,
        })
    }

    /// Have [`Supervisor`] start it again whenever it exits on its own, as a kubelet restarts
    /// a Deployment's or DaemonSet's container.
    #[must_use]
    pub fn supervised(mut self) -> Self {
        self.supervised = true;
        self
    }

    /// Stop the process (as [`Self::stop`]) and start it again as it was started, its output
    /// appended to the same log after a line that marks the restart.
    pub fn restart(&self, reaper: &Reaper, grace: Duration) -> Result<()> {
        let mut run = self.lock()?;
        stop(&mut run.child, grace)?;
        self.start_again(reaper, &mut run, RESTARTED)
    }

    fn start_again(&self, reaper: &Reaper, run: &mut Run, marker: &str) -> Result<()> {
        let mut out = File::options().append(true).open(&self.log)?;
        writeln!(out, "{marker}")?;
        let mut command = self.command.lock().map_err(|_| anyhow!("process lock poisoned"))?;
        run.child = start(reaper, &self.name, &mut command, out)?;
        run.started = Instant::now();
        run.restart_at = None;
        Ok(())
    }

    /// One look by the supervisor: a supervised process that exited on its own is reported
    /// (with the delay before it starts again), and started again once that delay is over.
    /// An error only if it cannot be started again.
    fn supervise(&self, reaper: &Reaper) -> Result<Option<Exit>> {
        if !self.supervised {
            return Ok(None);
        }
        let mut run = self.lock()?;
        if let Some(at) = run.restart_at {
            if Instant::now() >= at {
                let marker = format!("{RESTARTED} (restart {})", run.crash_loop.exits_in_a_row);
                self.start_again(reaper, &mut run, &marker)
                    .with_context(|| format!("{} cannot be restarted", self.name))?;
            }
            return Ok(None);
        }
        let Some(status) = run.child.try_wait()? else { return Ok(None) };
        // What it left behind in its group (a port held by a grandchild) goes with it.
        let group = format!("-{}", run.child.id());
        let _ =
            Command::new("kill").args(["-s", "KILL", "--", &group]).stderr(Stdio::null()).status();
        let ran = run.started.elapsed();
        let delay = run.crash_loop.exited(ran);
        run.restart_at = Some(Instant::now() + delay);
        Ok(Some(Exit {
            name: self.name.clone(),
            pid: run.child.id(),
            status: status.to_string(),
            ran,
            restart: run.crash_loop.exits_in_a_row,
            delay,
            crash_looping: run.crash_loop.looping(),
        }))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Run>> {
        self.run.lock().map_err(|_| anyhow!("process lock poisoned"))
    }

    /// The process id (also its process group).
    pub fn id(&self) -> Result<u32> {
        Ok(self.lock()?.child.id())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// An error, with the end of its log, if the process has exited.
    pub fn ensure_running(&self) -> Result<()> {
        match self.lock()?.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited ({status}); end of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 30)
            ),
        }
    }

    /// Poll the log until a line starts with `prefix`; returns the line.
    pub async fn wait_for_line(&self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let file = File::open(&self.log)?;
            if let Some(line) =
                BufReader::new(file).lines().map_while(Result::ok).find(|l| l.starts_with(prefix))
            {
                return Ok(line);
            }
            self.ensure_running()?;
            if Instant::now() > deadline {
                bail!("{} printed no {prefix:?} line within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM to the process group, SIGKILL after `grace`, then reap.
    pub fn stop(&self, grace: Duration) -> Result<()> {
        stop(&mut self.lock()?.child, grace)
    }
}

fn stop(child: &mut Child, grace: Duration) -> Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let group = format!("-{}", child.id());
    Command::new("kill").args(["-s", "TERM", "--", &group]).status()?;
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill").args(["-s", "KILL", "--", &group]).status()?;
    child.wait()?;
    Ok(())
}

/// The restart delays of a process that keeps exiting, as a kubelet's CrashLoopBackOff (10 s
/// doubling to 5 min there; shorter here, where a restart is cheap and someone is watching):
/// [`Self::FIRST`] after the first exit, doubling with each exit in a row up to [`Self::CAP`];
/// a process that ran [`Self::RESET`] before exiting starts over at `FIRST`.
#[derive(Clone, Debug, Default)]
pub struct CrashLoop {
    exits_in_a_row: u32,
}

impl CrashLoop {
    pub const FIRST: Duration = Duration::from_secs(1);
    pub const CAP: Duration = Duration::from_secs(30);
    pub const RESET: Duration = Duration::from_secs(60);

    /// The process exited after running `ran`: how long to wait before starting it again.
    pub fn exited(&mut self, ran: Duration) -> Duration {
        if ran >= Self::RESET {
            self.exits_in_a_row = 0;
        }
        self.exits_in_a_row += 1;
        self.delay()
    }

    fn delay(&self) -> Duration {
        let doublings = self.exits_in_a_row.saturating_sub(1).min(16);
        Self::FIRST.saturating_mul(1 << doublings).min(Self::CAP)
    }

    /// Whether it exits so often that it waits the longest: CrashLoopBackOff.
    pub fn looping(&self) -> bool {
        self.exits_in_a_row > 0 && self.delay() == Self::CAP
    }
}

/// A supervised process that exited on its own, and when it starts again.
#[derive(Clone, Debug)]
pub struct Exit {
    pub name: String,
    pub pid: u32,
    /// As the OS tells it, e.g. `signal: 9 (SIGKILL)` or `exit status: 1`.
    pub status: String,
    /// How long it had run.
    pub ran: Duration,
    /// Its restarts since it last ran [`CrashLoop::RESET`], this one included.
    pub restart: u32,
    pub delay: Duration,
    pub crash_looping: bool,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}) exited ({}) after {:.1} s; restart {} in {} s",
            self.name,
            self.pid,
            self.status,
            self.ran.as_secs_f64(),
            self.restart,
            self.delay.as_secs()
        )?;
        if self.crash_looping {
            write!(f, " (CrashLoopBackOff: it keeps exiting; see its log)")?;
        }
        Ok(())
    }
}

/// The processes of an environment, with a thread that starts the supervised ones again when
/// they exit on their own (each exit recorded, see [`Supervisor::exits`]). A process that
/// cannot be started again, or an unsupervised one that exits, is a failure
/// ([`Supervisor::ensure_running`]).
pub struct Supervisor {
    reaper: Reaper,
    processes: Mutex<Vec<Process>>,
    exits: Mutex<Vec<Exit>>,
    failure: Mutex<Option<String>>,
}

impl Supervisor {
    /// How often the thread looks at the processes.
    const PERIOD: Duration = Duration::from_millis(250);

    /// Supervise `processes` (and those added later); the thread ends with the supervisor.
    pub fn start(reaper: Reaper, processes: Vec<Process>) -> Result<std::sync::Arc<Supervisor>> {
        let supervisor = std::sync::Arc::new(Supervisor {
            reaper,
            processes: Mutex::new(processes),
            exits: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
        });
        let weak = std::sync::Arc::downgrade(&supervisor);
        std::thread::Builder::new().name("gpumarket-env-supervisor".into()).spawn(move || {
            while let Some(supervisor) = weak.upgrade() {
                supervisor.look();
                drop(supervisor);
                std::thread::sleep(Self::PERIOD);
            }
        })?;
        Ok(supervisor)
    }

    fn look(&self) {
        let Ok(processes) = self.processes.lock() else { return };
        for process in processes.iter() {
            match process.supervise(&self.reaper) {
                Ok(None) => {}
                Ok(Some(exit)) => {
                    if let Ok(mut exits) = self.exits.lock() {
                        exits.push(exit);
                    }
                }
                Err(e) => {
                    if let Ok(mut failure) = self.failure.lock() {
                        failure.get_or_insert_with(|| {
                            format!(
                                "{e:#}; end of {}:\n{}",
                                process.log.display(),
                                log_tail(&process.log, 30)
                            )
                        });
                    }
                }
            }
        }
    }

    pub fn reaper(&self) -> &Reaper {
        &self.reaper
    }

    pub fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<Process>>> {
        self.processes.lock().map_err(|_| anyhow!("environment lock poisoned"))
    }

    /// Every exit of a supervised process so far, oldest first.
    pub fn exits(&self) -> Vec<Exit> {
        self.exits.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Fail if an unsupervised process has exited or a supervised one could not be restarted.
    pub fn ensure_running(&self) -> Result<()> {
        if let Some(failure) = self.failure.lock().map_err(|_| anyhow!("lock poisoned"))?.clone() {
            bail!("{failure}");
        }
        self.lock()?.iter().filter(|p| !p.supervised).try_for_each(Process::ensure_running)
    }
}

/// The line [`Process::restart`] writes in the log before the new process's output.
pub const RESTARTED: &str = "--- restarted ---";

fn start(reaper: &Reaper, name: &str, command: &mut Command, out: File) -> Result<Child> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
    if let Err(e) = reaper.watch(child.id()) {
        // The environment is going away (a restart racing its shutdown): a child the reaper
        // does not know would outlive it.
        let group = format!("-{}", child.id());
        let _ =
            Command::new("kill").args(["-s", "KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::chaos::alive;

    /// The pipe closing (here by `finish`, at exit by the kernel) makes the reaper kill every
    /// registered group, grandchildren included, and remove the directory.
    #[test]
    fn reaper_kills_registered_groups_runs_cleanup_and_removes_the_directory_when_the_pipe_closes()
    {
        let dir = tempfile::tempdir().unwrap().keep();
        let reaper = Reaper::start(Some(&dir)).unwrap();
        let mut command = Command::new("/bin/sh");
        // A shell that ignores SIGTERM, with a grandchild: only the group SIGKILL ends both.
        command.args(["-c", "trap '' TERM; sleep 1000 & echo $! > grandchild; wait"]);
        command.current_dir(&dir);
        let process = Process::spawn(&reaper, &dir, "stubborn", command).unwrap();
        let pid = process.id().unwrap();
        let grandchild_file = dir.join("grandchild");
        while std::fs::read_to_string(&grandchild_file).map_or(true, |s| s.trim().is_empty()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let grandchild: u32 =
            std::fs::read_to_string(&grandchild_file).unwrap().trim().parse().unwrap();
        assert!(alive(pid) && alive(grandchild));
        // A cleanup script (outside the directory, which is gone by then) runs at the end too.
        let outside = tempfile::tempdir().unwrap();
        let script = outside.path().join("cleanup.sh");
        let marker = outside.path().join("ran");
        std::fs::write(&script, format!("touch {}\n", marker.display())).unwrap();
        reaper.run_at_end(&script).unwrap();

        reaper.finish().unwrap();
        let _ = process.lock().unwrap().child.wait();
        // The reaper works on its own time: the group's death and the removal take a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (alive(grandchild) || dir.exists()) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(grandchild), "grandchild killed");
        assert!(!dir.exists(), "directory removed");
        assert!(marker.exists(), "cleanup script ran");
    }

    #[test]
    fn crash_loop_waits_one_second_then_doubles_up_to_the_cap_and_starts_over_after_a_long_run() {
        let mut crash_loop = CrashLoop::default();
        let quick = Duration::from_secs(2);
        let delays: Vec<u64> = (0..7).map(|_| crash_loop.exited(quick).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert!(crash_loop.looping());
        // Many more exits stay at the cap (no overflow).
        for _ in 0..100 {
            assert_eq!(crash_loop.exited(quick), CrashLoop::CAP);
        }
        // A run as long as RESET was a success: the next exit is a first one again.
        assert_eq!(crash_loop.exited(CrashLoop::RESET), CrashLoop::FIRST);
        assert!(!crash_loop.looping());
        assert_eq!(crash_loop.exited(quick), Duration::from_secs(2));
    }

    #[test]
    fn an_exit_reads_what_died_how_the_restart_count_and_a_crash_loop() {
        let exit = Exit {
            name: "controller".into(),
            pid: 42,
            status: "exit status: 1".into(),
            ran: Duration::from_millis(1500),
            restart: 6,
            delay: CrashLoop::CAP,
            crash_looping: true,
        };
        assert_eq!(
            exit.to_string(),
            "controller (pid 42) exited (exit status: 1) after 1.5 s; restart 6 in 30 s \
             (CrashLoopBackOff: it keeps exiting; see its log)"
        );
        let first = Exit { restart: 1, delay: CrashLoop::FIRST, crash_looping: false, ..exit };
        assert!(first.to_string().ends_with("restart 1 in 1 s"), "{first}");
    }

    /// A supervised process killed with SIGKILL is reported and started again after a second;
    /// an unsupervised one that exits is a failure; one that cannot be started again is too.
    #[test]
    fn supervisor_restarts_a_killed_process_and_reports_what_cannot_run() {
        let dir = tempfile::tempdir().unwrap();
        let reaper = Reaper::start(None).unwrap();
        let mut sleeper = Command::new("sleep");
        sleeper.arg("1000");
        let sleeper = Process::spawn(&reaper, dir.path(), "sleeper", sleeper).unwrap().supervised();
        let first = sleeper.id().unwrap();
        let supervisor = Supervisor::start(reaper, vec![sleeper]).unwrap();

        Command::new("kill").args(["-KILL", &first.to_string()]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = || supervisor.lock().unwrap()[0].id().unwrap();
        while pid() == first && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_ne!(pid(), first, "restarted as a new process");
        assert!(alive(pid()));
        let exits = supervisor.exits();
        assert_eq!(exits.len(), 1, "{exits:?}");
        assert_eq!((exits[0].name.as_str(), exits[0].pid), ("sleeper", first));
        assert_eq!((exits[0].restart, exits[0].delay), (1, CrashLoop::FIRST));
        assert!(exits[0].status.contains("SIGKILL"), "{}", exits[0].status);
        let log = std::fs::read_to_string(dir.path().join("sleeper.log")).unwrap();
        assert!(log.contains(&format!("{RESTARTED} (restart 1)")), "{log}");
        supervisor.ensure_running().unwrap();

        // Unsupervised: its exit is the environment's failure.
        let mut quitter = Command::new("sh");
        quitter.args(["-c", "exit 3"]);
        let quitter = Process::spawn(supervisor.reaper(), dir.path(), "quitter", quitter).unwrap();
        supervisor.lock().unwrap().push(quitter);
        std::thread::sleep(Duration::from_millis(500));
        let failure = supervisor.ensure_running().unwrap_err().to_string();
        assert!(failure.contains("quitter exited (exit status: 3)"), "{failure}");
        supervisor.lock().unwrap().pop();

        // Supervised but its program is gone: it cannot be started again.
        // A copy of `false`: once started it needs its file no more.
        let program = dir.path().join("program");
        std::fs::copy("/bin/false", &program).unwrap();
        let gone = Process::spawn(supervisor.reaper(), dir.path(), "gone", Command::new(&program))
            .unwrap()
            .supervised();
        std::fs::remove_file(&program).unwrap();
        supervisor.lock().unwrap().push(gone);
        let deadline = Instant::now() + Duration::from_secs(10);
        while supervisor.ensure_running().is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let failure = format!("{:#}", supervisor.ensure_running().unwrap_err());
        assert!(failure.contains("gone cannot be restarted"), "{failure}");
        assert!(
            supervisor
                .exits()
                .iter()
                .any(|e| e.name == "gone" && e.status.contains("exit status: 1"))
        );
        supervisor.reaper().finish().unwrap();
    }

    #[test]
    fn nothing_restarted_outlives_the_environment_once_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let reaper = Reaper::start(None).unwrap();
        // A command line of its own, to find any copy of it.
        let seconds = (100_000 + std::process::id()).to_string();
        let mut sleeper = Command::new("sleep");
        sleeper.arg(&seconds);
        let sleeper = Process::spawn(&reaper, dir.path(), "sleeper", sleeper).unwrap().supervised();
        let supervisor = Supervisor::start(reaper, vec![sleeper]).unwrap();
        // The reaper kills it; the supervisor sees an exit and, a second later, tries again.
        supervisor.reaper().finish().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while supervisor.ensure_running().is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let failure = format!("{:#}", supervisor.ensure_running().unwrap_err());
        assert!(failure.contains("shutting down"), "{failure}");
        let pattern = format!("^sleep {seconds}$");
        let left = Command::new("pgrep").args(["-f", &pattern]).output().unwrap();
        let left = String::from_utf8_lossy(&left.stdout);
        assert!(left.trim().is_empty(), "started again after the end: pid {left}");
    }
}
