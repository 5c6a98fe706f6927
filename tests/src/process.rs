//! Child processes that never outlive the process that started them.
//!
//! Rust never drops statics, so the shared test environment cannot rely on `Drop`, and
//! `PR_SET_PDEATHSIG` fires when the spawning *thread* exits (test threads do). Instead each
//! environment starts a reaper: a tiny shell in its own process group that reads the process
//! group ids of the environment's children (and `run <script>` lines: cleanup scripts) from a
//! pipe. The parent holds the pipe's write end until it exits — however it exits, even
//! SIGKILL — and the kernel then closes it: the reaper reads EOF, terminates every group
//! (SIGTERM, then SIGKILL), runs the cleanup scripts, and removes the environment's directory.

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
    child: Mutex<Child>,
    /// How it was started, to start it again.
    command: Mutex<Command>,
}

impl Process {
    pub fn spawn(reaper: &Reaper, logs: &Path, name: &str, mut command: Command) -> Result<Self> {
        let log = logs.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = start(reaper, name, &mut command, out)?;
        Ok(Process {
            name: name.to_string(),
            log,
            child: Mutex::new(child),
            command: Mutex::new(command),
        })
    }

    /// Stop the process (as [`Self::stop`]) and start it again as it was started, its output
    /// appended to the same log after a line that marks the restart.
    pub fn restart(&self, reaper: &Reaper, grace: Duration) -> Result<()> {
        self.stop(grace)?;
        let mut out = File::options().append(true).open(&self.log)?;
        writeln!(out, "{RESTARTED}")?;
        let mut command = self.command.lock().map_err(|_| anyhow!("process lock poisoned"))?;
        let child = start(reaper, &self.name, &mut command, out)?;
        *self.child.lock().map_err(|_| anyhow!("process lock poisoned"))? = child;
        Ok(())
    }

    /// The process id (also its process group).
    pub fn id(&self) -> Result<u32> {
        Ok(self.child.lock().map_err(|_| anyhow!("process lock poisoned"))?.id())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// An error, with the end of its log, if the process has exited.
    pub fn ensure_running(&self) -> Result<()> {
        let mut child = self.child.lock().map_err(|_| anyhow!("process lock poisoned"))?;
        match child.try_wait()? {
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
        let mut child = self.child.lock().map_err(|_| anyhow!("process lock poisoned"))?;
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
}

/// The line [`Process::restart`] writes in the log before the new process's output.
pub const RESTARTED: &str = "--- restarted ---";

fn start(reaper: &Reaper, name: &str, command: &mut Command, out: File) -> Result<Child> {
    let child = command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
    reaper.watch(child.id())?;
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

    fn alive(pid: u32) -> bool {
        // A reaped or killed child is gone, or a zombie until its parent waits.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or_default().trim().starts_with('Z'))
    }

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
        let pid = process.child.lock().unwrap().id();
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
        let _ = process.child.lock().unwrap().wait();
        // The reaper works on its own time: the group's death and the removal take a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (alive(grandchild) || dir.exists()) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(grandchild), "grandchild killed");
        assert!(!dir.exists(), "directory removed");
        assert!(marker.exists(), "cleanup script ran");
    }
}
