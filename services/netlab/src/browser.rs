//! A headless Chromium in a lab host's namespace, driven over the DevTools
//! protocol on a pipe (`--remote-debugging-pipe`: JSON messages ending in
//! a NUL byte on file descriptors 3 and 4), so that tests load our pages
//! the way a viewer's browser does and read what the page reports.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};

/// How long one DevTools call may take.
const CALL_WAIT: Duration = Duration::from_secs(20);

/// The Chromium binary (Debian's `chromium`), if installed.
pub fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|b| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// One headless Chromium with one page.
pub struct Browser {
    child: Child,
    to: std::fs::File,
    from: mpsc::Receiver<Value>,
    next: u64,
    session: String,
}

impl Browser {
    /// Starts Chromium in namespace `ns` (none: this one) on `url`, its
    /// profile in `profile` (a fresh folder), its log in `log`.
    pub fn open(ns: Option<&str>, url: &str, profile: &Path, log: &Path) -> Result<Browser> {
        Browser::open_with(ns, url, profile, log, &[])
    }

    /// [`Browser::open`] with more command-line switches (e.g.
    /// `--unsafely-treat-insecure-origin-as-secure=ORIGIN`, for a page
    /// over plain HTTP that asks for the camera).
    pub fn open_with(ns: Option<&str>, url: &str, profile: &Path, log: &Path, extra: &[String]) -> Result<Browser> {
        let binary = chromium().context("chromium is not installed (apt-get install chromium)")?;
        std::fs::create_dir_all(profile)?;
        let (cmd_read, cmd_write) = std::io::pipe()?;
        let (out_read, out_write) = std::io::pipe()?;
        let mut command = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, binary]);
                c
            }
            None => Command::new(binary),
        };
        command
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe"])
            .args(["--autoplay-policy=no-user-gesture-required", "--window-size=1000,700", "--no-first-run"])
            // A page that publishes gets a generated camera and microphone.
            .args(["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?);
        let (child_in, child_out): (OwnedFd, OwnedFd) = (cmd_read.into(), out_write.into());
        let (a, b) = (child_in.as_raw_fd(), child_out.as_raw_fd());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork
        // and exec; the descriptors stay open in the parent until spawn
        // returns.
        unsafe {
            command.pre_exec(move || {
                // Out of the way first, so that 3 and 4 can be taken
                // whatever the pipes got.
                let a2 = libc::fcntl(a, libc::F_DUPFD, 10);
                let b2 = libc::fcntl(b, libc::F_DUPFD, 10);
                if a2 < 0 || b2 < 0 || libc::dup2(a2, 3) < 0 || libc::dup2(b2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().with_context(|| format!("starting {binary}"))?;
        drop(child_in);
        drop(child_out);
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(out_read);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        buf.pop_if(|b| *b == 0);
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        let to = std::fs::File::from(OwnedFd::from(cmd_write));
        let mut browser = Browser { child, to, from, next: 0, session: String::new() };
        let targets = browser.call("Target.getTargets", json!({}), false)?;
        let page = targets["targetInfos"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .ok_or_else(|| anyhow!("chromium has no page: {targets}"))?;
        let attached =
            browser.call("Target.attachToTarget", json!({"targetId": page["targetId"], "flatten": true}), false)?;
        browser.session =
            attached["sessionId"].as_str().ok_or_else(|| anyhow!("no DevTools session: {attached}"))?.to_string();
        Ok(browser)
    }

    /// One DevTools call (on the page's session when `page`): its result.
    fn call(&mut self, method: &str, params: Value, page: bool) -> Result<Value> {
        self.next += 1;
        let id = self.next;
        let mut message = json!({"id": id, "method": method, "params": params});
        if page {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message)?;
        bytes.push(0);
        self.to.write_all(&bytes).with_context(|| format!("DevTools {method}: chromium is gone"))?;
        let deadline = std::time::Instant::now() + CALL_WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let reply =
                self.from.recv_timeout(left).map_err(|_| anyhow!("DevTools {method}: no answer in {CALL_WAIT:?}"))?;
            if reply["id"].as_u64() == Some(id) {
                if let Some(e) = reply.get("error") {
                    bail!("DevTools {method}: {e}");
                }
                return Ok(reply["result"].clone());
            }
        }
    }

    /// Evaluates `expression` in the page: its value (JSON).
    pub fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true}), true)?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("the page threw evaluating {expression:?}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Saves a PNG screenshot of the page.
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}), true)?;
        let data = r["data"].as_str().ok_or_else(|| anyhow!("no screenshot data"))?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// Closes the browser (killed if it does not go within 5 s).
    pub fn close(mut self) {
        let _ = self.call("Browser.close", json!({}), false);
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
