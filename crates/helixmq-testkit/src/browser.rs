//! A real browser for the console's tests: Debian's headless `chromium`
//! driven through WebDriver (`chromedriver`, installed by `scripts/provision`)
//! with fantoccini.
//!
//! [`Browser::start`] runs a `chromedriver` of the test's own on a port the
//! driver picks itself (`--port=0`; it prints the port once it listens, so
//! there is neither a free-port race nor a wait on a guessed port), with its
//! output kept for error messages, and opens one headless chromium session
//! with a fresh profile. Dropping the [`Browser`] kills chromedriver and every
//! chromium process it started (they share a process group) and removes the
//! profile; [`Browser::close`] ends the session politely first.
//!
//! The helpers take CSS selectors. Those that act on an element wait for it
//! up to [`Browser::WAIT`]; the explicit waits take their own timeout. A
//! timeout's error says what was awaited and shows the page's URL and visible
//! text; a failed command shows chromedriver's output.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::error::CmdError;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};

/// The WebDriver client the helpers wrap, for anything they do not cover.
pub use fantoccini;

/// Debian's chromium (a launcher script that adds `/etc/chromium.d` flags).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's chromedriver (package `chromium-driver`, same version as chromium).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The browser window's size in pixels. A screenshot shows the viewport: as
/// wide, less high by the browser frame headless chromium emulates (1280 × 757).
pub const WINDOW: (u32, u32) = (1280, 900);

/// How long chromedriver may take to listen, and chromium to open a session.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a wait looks at the page again: WebDriver cannot tell us when the
/// DOM changed, so a wait asks the page, and each look is one round trip.
const POLL: Duration = Duration::from_millis(50);
/// How much of chromedriver's (and chromium's) output is kept for errors.
const LOG_TAIL: usize = 32 * 1024;
/// How much of a page's text a timeout error shows.
const PAGE_TEXT: usize = 4000;

/// What went wrong, with what a test needs to see why.
#[derive(thiserror::Error)]
pub enum BrowserError {
    /// chromedriver did not start, or chromium did not open a session.
    #[error("{what}\n--- chromedriver output ---\n{log}")]
    Start {
        /// What failed.
        what: String,
        /// chromedriver's output (and chromium's, which it passes on).
        log: String,
    },
    /// A WebDriver command failed.
    #[error("{what}: {source}\n--- chromedriver output ---\n{log}")]
    Command {
        /// The command and its target.
        what: String,
        /// fantoccini's error.
        #[source]
        source: CmdError,
        /// chromedriver's output (and chromium's, which it passes on).
        log: String,
    },
    /// A wait ended before its condition held.
    #[error("timed out after {after:?} waiting for {what}\n--- page {url} ---\n{text}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
        /// The page's URL then.
        url: String,
        /// The page's visible text then (its start).
        text: String,
    },
    /// A screenshot could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The readable form: a test that `unwrap`s or returns the error prints this.
impl fmt::Debug for BrowserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A headless chromium session of the test's own.
pub struct Browser {
    /// The WebDriver session (dropped before the driver it talks to).
    client: Client,
    /// The chromedriver process and chromium's profile, removed on drop.
    driver: Driver,
}

impl fmt::Debug for Browser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Browser")
            .field("webdriver", &self.driver.url)
            .finish_non_exhaustive()
    }
}

impl Browser {
    /// How long the element helpers ([`Browser::click`], [`Browser::fill`],
    /// [`Browser::text`]) wait for their element to appear.
    pub const WAIT: Duration = Duration::from_secs(10);

    /// Start chromedriver and open a headless chromium
    /// (`--headless=new --no-sandbox --disable-gpu`, [`WINDOW`] sized).
    pub async fn start() -> Result<Browser, BrowserError> {
        let driver = Driver::start().await?;
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            format!("--window-size={},{}", WINDOW.0, WINDOW.1),
            format!("--user-data-dir={}", driver.profile.path().display()),
        ];
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        let Value::Object(caps) = caps else {
            unreachable!("a JSON object literal")
        };
        let connect = tokio::time::timeout(
            START_TIMEOUT,
            ClientBuilder::new(HttpConnector::new())
                .capabilities(caps)
                .connect(&driver.url),
        )
        .await;
        let what = match connect {
            Ok(Ok(client)) => return Ok(Browser { client, driver }),
            Ok(Err(e)) => format!("chromium session on {}: {e}", driver.url),
            Err(_) => format!("no chromium session within {START_TIMEOUT:?}"),
        };
        Err(BrowserError::Start {
            what,
            log: driver.log(),
        })
    }

    /// The fantoccini client, for what the helpers do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Open `url` and wait for its load event.
    pub async fn goto(&self, url: &str) -> Result<(), BrowserError> {
        self.client
            .goto(url)
            .await
            .map_err(|e| self.command(format!("goto {url}"), e))
    }

    /// Wait up to `timeout` for an element matching `selector`.
    pub async fn wait_for(
        &self,
        selector: &str,
        timeout: Duration,
    ) -> Result<Element, BrowserError> {
        let what = format!("an element `{selector}`");
        self.poll(&what, timeout, || async {
            match self.client.find(Locator::Css(selector)).await {
                Ok(e) => Ok(Some(e)),
                Err(e) if e.is_no_such_element() => Ok(None),
                Err(e) => Err(self.command(format!("find `{selector}`"), e)),
            }
        })
        .await
    }

    /// Wait up to `timeout` until the visible text of the first element
    /// matching `selector` contains `needle`; returns that text.
    pub async fn wait_for_text(
        &self,
        selector: &str,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, BrowserError> {
        let what = format!("{needle:?} in `{selector}`");
        self.wait_for_text_where(selector, &what, |t| t.contains(needle), timeout)
            .await
    }

    /// Wait up to `timeout` until the visible text of the first element
    /// matching `selector` satisfies `test`; returns that text. `what`
    /// describes the condition for the timeout's message ("a number other than 3").
    pub async fn wait_for_text_where(
        &self,
        selector: &str,
        what: &str,
        test: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, BrowserError> {
        let what = format!("{what} in `{selector}`");
        let test = &test;
        self.poll(&what, timeout, || async move {
            // One script per look: it reads the element the page has now, so
            // an element the page replaced (an htmx swap) is never stale.
            Ok(self.inner_text(selector).await?.filter(|t| test(t)))
        })
        .await
    }

    /// Click the element matching `selector` (waiting up to [`Browser::WAIT`]).
    pub async fn click(&self, selector: &str) -> Result<(), BrowserError> {
        let e = self.wait_for(selector, Self::WAIT).await?;
        e.click()
            .await
            .map_err(|e| self.command(format!("click `{selector}`"), e))
    }

    /// Replace the value of the input matching `selector` by `value`, typed as
    /// a user would (waiting up to [`Browser::WAIT`] for the input).
    pub async fn fill(&self, selector: &str, value: &str) -> Result<(), BrowserError> {
        let e = self.wait_for(selector, Self::WAIT).await?;
        e.clear()
            .await
            .map_err(|e| self.command(format!("clear `{selector}`"), e))?;
        e.send_keys(value)
            .await
            .map_err(|e| self.command(format!("type into `{selector}`"), e))
    }

    /// The visible text of the element matching `selector` (waiting up to
    /// [`Browser::WAIT`] for it).
    pub async fn text(&self, selector: &str) -> Result<String, BrowserError> {
        let what = format!("an element `{selector}`");
        self.poll(&what, Self::WAIT, || self.inner_text(selector))
            .await
    }

    /// How many elements match `selector` now (no wait: for asserting that
    /// something is absent).
    pub async fn count(&self, selector: &str) -> Result<usize, BrowserError> {
        self.client
            .find_all(Locator::Css(selector))
            .await
            .map(|v| v.len())
            .map_err(|e| self.command(format!("find all `{selector}`"), e))
    }

    /// The page's URL and its visible text.
    pub async fn page_text(&self) -> Result<(String, String), BrowserError> {
        let v = self
            .client
            .execute(
                "return [location.href, document.body ? document.body.innerText \
                 : document.documentElement.outerHTML];",
                vec![],
            )
            .await
            .map_err(|e| self.command("read the page".into(), e))?;
        let part = |i: usize| v[i].as_str().unwrap_or_default().to_string();
        Ok((part(0), part(1)))
    }

    /// Save a PNG of the window at `path`, creating its folders.
    pub async fn screenshot(&self, path: impl AsRef<Path>) -> Result<(), BrowserError> {
        let path = path.as_ref();
        let png = self
            .client
            .screenshot()
            .await
            .map_err(|e| self.command("screenshot".into(), e))?;
        let io = |source| BrowserError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        std::fs::write(path, png).map_err(io)
    }

    /// End the session (chromium quits), then stop chromedriver.
    pub async fn close(self) -> Result<(), BrowserError> {
        let Browser { client, driver } = self;
        let closed = client.close().await;
        closed.map_err(|source| BrowserError::Command {
            what: "close the session".into(),
            source,
            log: driver.log(),
        })
    }

    /// The visible text of the first element matching `selector`, if any.
    async fn inner_text(&self, selector: &str) -> Result<Option<String>, BrowserError> {
        let v = self
            .client
            .execute(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
                vec![Value::from(selector)],
            )
            .await
            .map_err(|e| self.command(format!("read `{selector}`"), e))?;
        Ok(v.as_str().map(str::to_string))
    }

    /// Ask `look` every [`POLL`] until it gives a value or `timeout` passed;
    /// a timeout reports `what` and the page.
    async fn poll<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        mut look: F,
    ) -> Result<T, BrowserError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, BrowserError>>,
    {
        let start = Instant::now();
        loop {
            if let Some(v) = look().await? {
                return Ok(v);
            }
            if start.elapsed() >= timeout {
                let (url, text) = self.page_text().await?;
                return Err(BrowserError::Timeout {
                    what: what.to_string(),
                    after: timeout,
                    url,
                    text: head(&text, PAGE_TEXT),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn command(&self, what: String, source: CmdError) -> BrowserError {
        BrowserError::Command {
            what,
            source,
            log: self.driver.log(),
        }
    }
}

/// A chromedriver process of one [`Browser`].
struct Driver {
    /// chromedriver, leader of a process group of its own that the chromium
    /// processes it starts join: dropping kills the whole group.
    child: Child,
    /// `http://127.0.0.1:PORT`, the port chromedriver chose.
    url: String,
    /// The tail of chromedriver's stdout and stderr, filled by two threads
    /// that end when the last process holding the pipes exits.
    log: Arc<Mutex<String>>,
    /// chromium's profile (`--user-data-dir`): removed after the kill, where
    /// chromedriver's own temporary profile would be left behind.
    profile: tempfile::TempDir,
}

impl Driver {
    async fn start() -> Result<Driver, BrowserError> {
        let log = Arc::new(Mutex::new(String::new()));
        let fail = |what: String, log: &Arc<Mutex<String>>| BrowserError::Start {
            what,
            log: log.lock().unwrap().clone(),
        };
        let profile = tempfile::Builder::new()
            .prefix("helixmq-chromium-")
            .tempdir()
            .map_err(|e| fail(format!("a profile folder: {e}"), &log))?;
        let mut child = {
            use std::os::unix::process::CommandExt;
            Command::new(CHROMEDRIVER)
                .arg("--port=0")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .spawn()
                .map_err(|e| {
                    fail(
                        format!("cannot run {CHROMEDRIVER} ({e}); scripts/provision installs it"),
                        &log,
                    )
                })?
        };
        // From here on `driver` owns the process: an early return kills it.
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (port_tx, port_rx) = tokio::sync::oneshot::channel();
        let mut driver = Driver {
            child,
            url: String::new(),
            log: log.clone(),
            profile,
        };
        let out_log = log.clone();
        std::thread::spawn(move || {
            let mut port_tx = Some(port_tx);
            drain(stdout, &out_log, |line| {
                // "ChromeDriver was started successfully on port 40123."
                let port = line
                    .split_once("started successfully on port ")
                    .and_then(|(_, rest)| rest.trim_end_matches('.').parse::<u16>().ok());
                if let Some(port) = port {
                    if let Some(tx) = port_tx.take() {
                        let _ = tx.send(port);
                    }
                }
            });
            // End of stdout: a sender still here is dropped, and the start
            // below learns that chromedriver exited without listening.
        });
        let err_reader = std::thread::spawn(move || drain(stderr, &log, |_| {}));
        let port = match tokio::time::timeout(START_TIMEOUT, port_rx).await {
            Ok(Ok(port)) => port,
            Ok(Err(_)) => {
                // Its stdout ended: it exited. Let the stderr reader take
                // its last words before they are reported.
                let status = driver.child.wait().map(|s| s.to_string());
                let _ = err_reader.join();
                return Err(fail(
                    format!("{CHROMEDRIVER} exited before it listened ({status:?})"),
                    &driver.log,
                ));
            }
            Err(_) => {
                return Err(fail(
                    format!("{CHROMEDRIVER} did not listen within {START_TIMEOUT:?}"),
                    &driver.log,
                ))
            }
        };
        driver.url = format!("http://127.0.0.1:{port}");
        Ok(driver)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group's id is chromedriver's pid, which stays ours until the
        // wait below reaps it, so this cannot hit a stranger's group.
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Read `pipe` to its end line by line (as lossy UTF-8: chromium's output is
/// not always text), show each line to `look`, keep it in `log`. Reading on
/// until the end matters: a full pipe would block chromedriver.
fn drain(pipe: impl Read, log: &Mutex<String>, mut look: impl FnMut(&str)) {
    let mut pipe = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match pipe.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end();
                look(line);
                append(log, line);
            }
        }
    }
}

/// Append a line to a log, keeping only its last [`LOG_TAIL`] bytes.
fn append(log: &Mutex<String>, line: &str) {
    let mut log = log.lock().unwrap();
    log.push_str(line);
    log.push('\n');
    if log.len() > LOG_TAIL {
        let mut cut = log.len() - LOG_TAIL;
        while !log.is_char_boundary(cut) {
            cut += 1;
        }
        log.drain(..cut);
    }
}

/// The first `max` bytes of `text` (at a character boundary), marked when cut.
fn head(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[… {} more bytes]", &text[..end], text.len() - end)
}
