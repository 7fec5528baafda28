//! The loss bench's browser side, run by `scripts/loss` inside its network
//! namespace: two headless Chromium pages with a speech-like microphone call
//! each other through a running beep-sfu, and each page's `getStats()` is
//! read at the middle and at the end of the call. What the second half
//! shows, per page, is printed as one JSON line: packets received and lost,
//! the concealment ratio (concealedSamples / totalSamplesReceived), its
//! audible part (less silentConcealedSamples: concealment that played out
//! as silence, as after a lost DTX frame), concealment events and the mean
//! jitter-buffer delay.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use beep_sfu::testkit::chromium::{speech_wav, Browser};
use clap::Parser;
use serde_json::{json, Value};

/// Two Chromium pages in one call through beep-sfu; prints one JSON line.
#[derive(Parser, Debug)]
#[command(name = "beep-sfu-lossbench")]
struct Args {
    /// The server's HTTP address (host:port), as the pages reach it.
    #[arg(long)]
    server: String,
    /// Length of the call in seconds; the second half is measured.
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// A label carried into the output (the build and its settings).
    #[arg(long, default_value = "")]
    label: String,
    /// The loss applied on each leg, in percent, carried into the output.
    #[arg(long, default_value_t = 0)]
    loss: u32,
}

/// What one page's inbound audio says, summed over its streams.
const SNAPSHOT: &str = r#"(async () => {
  const r = await window.beep.pc.getStats();
  const o = { received: 0, lost: 0, concealed: 0, silent_concealed: 0, samples: 0,
              events: 0, jb_delay: 0, jb_emitted: 0, sent: 0, codec: null };
  r.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      o.received += s.packetsReceived || 0;
      o.lost += s.packetsLost || 0;
      o.concealed += s.concealedSamples || 0;
      o.silent_concealed += s.silentConcealedSamples || 0;
      o.samples += s.totalSamplesReceived || 0;
      o.events += s.concealmentEvents || 0;
      o.jb_delay += s.jitterBufferDelay || 0;
      o.jb_emitted += s.jitterBufferEmittedCount || 0;
      if ((s.packetsReceived || 0) > 0) o.codec = (r.get(s.codecId) || {}).mimeType || null;
    }
    if (s.type === "outbound-rtp" && s.kind === "audio") o.sent += s.packetsSent || 0;
  });
  return JSON.stringify(o);
})()"#;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("beep-sfu-lossbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: &Args) -> Result<Value, String> {
    let dir = std::env::temp_dir().join(format!("beep-sfu-lossbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let wav: PathBuf = dir.join("speech.wav");
    speech_wav(&wav, a.secs as u32 + 30).map_err(|e| e.to_string())?;
    // The server is not on localhost: let its origin use the microphone.
    let secure = format!(
        "--unsafely-treat-insecure-origin-as-secure=http://{}",
        a.server
    );
    let mut b = Browser::start_with(&wav, dir.join("chromium"), &[secure])?;
    let conv = format!("loss-{}", std::process::id());
    let page = |u: &str| {
        format!(
            "http://{}/?userid={u}&clientid=tab&conversation={conv}&autojoin=1&raw=1",
            a.server
        )
    };
    let pages = [b.open(&page("ann")), b.open(&page("ben"))];
    wait(&mut b, &pages, Duration::from_secs(30), "joined", |b, p| {
        b.eval(p, "window.beep && window.beep.state") == "joined"
    })?;
    wait(&mut b, &pages, Duration::from_secs(30), "audio", |b, p| {
        b.eval(p, "window.beep.stats.received")
            .as_u64()
            .unwrap_or(0)
            > 0
    })?;
    let half = Duration::from_secs(a.secs / 2);
    std::thread::sleep(half);
    let mid: Vec<Value> = pages.iter().map(|p| snapshot(&mut b, p)).collect();
    std::thread::sleep(half);
    let end: Vec<Value> = pages.iter().map(|p| snapshot(&mut b, p)).collect();
    let answer = b.eval(&pages[0], "window.beep.pc.remoteDescription.sdp");
    let offer = b.eval(&pages[0], "window.beep.pc.localDescription.sdp");
    let sdp_has = |sdp: &Value, what: &str| sdp.as_str().unwrap_or("").contains(what);
    let per_page: Vec<Value> = mid
        .iter()
        .zip(&end)
        .map(|(m, e)| second_half(m, e))
        .collect();
    let worst = |k: &str| {
        per_page
            .iter()
            .map(|p| p[k].as_f64().unwrap_or(0.0))
            .fold(0.0, f64::max)
    };
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "label": a.label,
        "loss": a.loss,
        "secs": a.secs,
        "answer_red": sdp_has(&answer, " red/48000/2"),
        "offer_audio_nack": offer.as_str().unwrap_or("").lines().any(|l| l.starts_with("a=rtcp-fb:111 nack")),
        "worst_concealment": worst("concealment"),
        "worst_audible_concealment": worst("audible_concealment"),
        "pages": per_page,
    }))
}

/// Polls `done` for every page until it holds or `within` passes.
fn wait(
    b: &mut Browser,
    pages: &[String],
    within: Duration,
    what: &str,
    done: impl Fn(&mut Browser, &str) -> bool,
) -> Result<(), String> {
    let end = Instant::now() + within;
    while !pages.iter().all(|p| done(b, p)) {
        if Instant::now() > end {
            let errors: Vec<Value> = pages
                .iter()
                .map(|p| b.eval(p, "window.beep && window.beep.error"))
                .collect();
            return Err(format!("pages not {what} within {within:?}: {errors:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn snapshot(b: &mut Browser, page: &str) -> Value {
    let v = b.eval(page, SNAPSHOT);
    serde_json::from_str(v.as_str().unwrap_or("{}")).unwrap_or(Value::Null)
}

/// The second half of the call from two snapshots.
fn second_half(mid: &Value, end: &Value) -> Value {
    let d = |k: &str| end[k].as_f64().unwrap_or(0.0) - mid[k].as_f64().unwrap_or(0.0);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    json!({
        "received": d("received"),
        "lost": d("lost"),
        "lost_ratio": ratio(d("lost"), d("received") + d("lost")),
        "concealment": ratio(d("concealed"), d("samples")),
        "silent_concealment": ratio(d("silent_concealed"), d("samples")),
        "audible_concealment": ratio(d("concealed") - d("silent_concealed"), d("samples")),
        "concealment_events": d("events"),
        "jitter_buffer_ms": 1000.0 * ratio(d("jb_delay"), d("jb_emitted")),
        "sent": d("sent"),
        "codec": end["codec"],
    })
}
