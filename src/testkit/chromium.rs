//! Headless Chromium driven over the DevTools protocol, and the fake
//! microphones it plays: what the browser test and the loss bench
//! (`beep-sfu-lossbench`) share. Test kit only: it panics on a browser that
//! does not answer, which is a failed test or a failed bench run.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// Debian's Chromium binary.
pub const CHROMIUM: &str = "/usr/lib/chromium/chromium";

/// Writes 48 kHz mono 16-bit PCM samples (in -1..1) as a WAV file.
fn write_wav(path: &Path, samples: impl ExactSizeIterator<Item = f64>) -> std::io::Result<()> {
    let rate = 48_000u32;
    let n = samples.len() as u32;
    let mut data = Vec::with_capacity(44 + n as usize * 2);
    data.extend_from_slice(b"RIFF");
    data.extend_from_slice(&(36 + n * 2).to_le_bytes());
    data.extend_from_slice(b"WAVEfmt ");
    data.extend_from_slice(&16u32.to_le_bytes());
    data.extend_from_slice(&1u16.to_le_bytes()); // PCM
    data.extend_from_slice(&1u16.to_le_bytes()); // mono
    data.extend_from_slice(&rate.to_le_bytes());
    data.extend_from_slice(&(rate * 2).to_le_bytes());
    data.extend_from_slice(&2u16.to_le_bytes());
    data.extend_from_slice(&16u16.to_le_bytes());
    data.extend_from_slice(b"data");
    data.extend_from_slice(&(n * 2).to_le_bytes());
    for v in samples {
        data.extend_from_slice(&((v.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes());
    }
    std::fs::write(path, data)
}

/// A 48 kHz mono WAV of a sine tone at half scale.
pub fn tone_wav(path: &Path, hz: f64, secs: u32) -> std::io::Result<()> {
    let rate = 48_000.0;
    let n = 48_000 * secs as usize;
    write_wav(
        path,
        (0..n).map(move |i| (i as f64 * hz * 2.0 * std::f64::consts::PI / rate).sin() * 0.5),
    )
}

/// A 48 kHz mono WAV that Opus treats as a voice, not music: syllables of
/// voiced harmonics (a fundamental gliding around 110-220 Hz with ten
/// harmonics falling off at 6 dB per octave, a raised-cosine envelope),
/// 120-300 ms long, in words of two to five, with pauses of 80 ms between
/// syllables and 300-900 ms between words. Deterministic.
pub fn speech_wav(path: &Path, secs: u32) -> std::io::Result<()> {
    let rate = 48_000.0;
    let n = 48_000 * secs as usize;
    let mut out = vec![0.0f64; n];
    let mut next = crate::sfu::test_rng::xorshift(0x2545_f491_4f6c_dd1d);
    let mut rnd = move || (next() >> 11) as f64 / (1u64 << 53) as f64;
    let mut at = (0.2 * rate) as usize;
    while at < n {
        let syllables = 2 + (rnd() * 4.0) as usize;
        for _ in 0..syllables {
            let len = ((0.12 + rnd() * 0.18) * rate) as usize;
            let f0 = 110.0 + rnd() * 110.0;
            let glide = (rnd() - 0.5) * 0.3;
            let loud = 0.25 + rnd() * 0.25;
            let mut phase = 0.0f64;
            for i in 0..len.min(n.saturating_sub(at)) {
                let t = i as f64 / len as f64;
                let env = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * t).cos();
                let f = f0 * (1.0 + glide * t);
                phase += 2.0 * std::f64::consts::PI * f / rate;
                let voiced: f64 = (1..=10).map(|h| (phase * h as f64).sin() / h as f64).sum();
                out[at + i] = loud * env * voiced * 0.5;
            }
            at += len + (0.08 * rate) as usize;
        }
        at += ((0.3 + rnd() * 0.6) * rate) as usize;
    }
    write_wav(path, out.into_iter())
}

/// One headless Chromium, its DevTools socket and its profile directory
/// (removed on drop, with the process).
pub struct Browser {
    child: Child,
    ws: WebSocket<TcpStream>,
    next_id: u64,
    dir: PathBuf,
}

impl Browser {
    /// Starts Chromium with `wav` as every page's microphone.
    pub fn start(wav: &Path, dir: PathBuf) -> Result<Browser, String> {
        Self::start_with(wav, dir, &[])
    }

    /// [`Browser::start`] with more command-line flags.
    pub fn start_with(wav: &Path, dir: PathBuf, extra: &[String]) -> Result<Browser, String> {
        if !Path::new(CHROMIUM).exists() {
            return Err(format!(
                "Chromium is required: apt-get install chromium ({CHROMIUM})"
            ));
        }
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                "--allow-loopback-in-peer-connection",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--autoplay-policy=no-user-gesture-required",
                "--remote-debugging-port=0",
            ])
            .arg(format!(
                "--use-file-for-fake-audio-capture={}",
                wav.display()
            ))
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .args(extra)
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("Chromium failed to start: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "Chromium did not print its DevTools address within 30 s")?;
        let (ws, _) = tungstenite::connect(url.as_str()).map_err(|e| format!("DevTools: {e}"))?;
        let ws = match ws.into_inner() {
            tungstenite::stream::MaybeTlsStream::Plain(s) => {
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| e.to_string())?;
                WebSocket::from_raw_socket(s, tungstenite::protocol::Role::Client, None)
            }
            _ => return Err("plain DevTools socket expected".into()),
        };
        Ok(Browser {
            child,
            ws,
            next_id: 1,
            dir,
        })
    }

    /// One DevTools call; returns its result. Panics if the browser does
    /// not answer or answers with an error.
    pub fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .expect("DevTools takes the call");
        loop {
            let m = self.ws.read().expect("DevTools answers");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).expect("DevTools speaks JSON");
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Opens a page; returns its session id.
    pub fn open(&mut self, url: &str) -> String {
        let target = self.call(None, "Target.createTarget", json!({"url": url}));
        let id = target["targetId"].as_str().unwrap_or_default().to_string();
        let att = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": id, "flatten": true}),
        );
        att["sessionId"].as_str().unwrap_or_default().to_string()
    }

    /// Evaluates a JavaScript expression in a page (awaiting it if it is a
    /// promise) and returns its value.
    pub fn eval(&mut self, session: &str, expr: &str) -> Value {
        let r = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        r["result"]["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
