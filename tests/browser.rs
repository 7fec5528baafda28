//! A real browser through beep-sfu: headless Chromium (Debian's package)
//! with a fake microphone playing a 440 Hz tone, driven over the DevTools
//! protocol, joins conversations through the demo page.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use beep_sfu::testkit::chromium::{tone_wav, Browser};
use serde_json::{json, Value};

use common::*;

fn decode(ogg: &std::path::Path) -> (f64, f64) {
    let wav = ogg.with_extension("wav");
    let status = Command::new("opusdec")
        .args(["--quiet", "--rate", "48000"])
        .arg(ogg)
        .arg(&wav)
        .status()
        .expect("opusdec must be installed for this test (apt-get install opus-tools)");
    assert!(status.success(), "opusdec decodes {}", ogg.display());
    let data = std::fs::read(&wav).unwrap();
    let channels = u16::from_le_bytes([data[22], data[23]]) as usize;
    let start = data.windows(4).position(|w| w == b"data").unwrap() + 8;
    let samples: Vec<i16> = data[start..]
        .chunks_exact(2 * channels)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect();
    let secs = samples.len() as f64 / 48_000.0;
    // Skip the first 100 ms (decoder convergence), count rising zero crossings.
    let body = &samples[samples.len().min(4800)..];
    let crossings = body.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count();
    (secs, crossings as f64 / (body.len() as f64 / 48_000.0))
}

#[test]
fn chromium_pages_hear_each_other_and_not_other_conversations() {
    let dir = std::env::temp_dir().join(format!("beep-sfu-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    init_log();
    let mut cfg = test_config(true, "");
    cfg.bites_dir = Some(dir.join("bites"));
    let server = beep_sfu::server::Server::start(&cfg).unwrap();
    let http = server.http_addr();
    let wav = dir.join("tone.wav");
    tone_wav(&wav, 440.0, 10).unwrap();
    let mut b = Browser::start(&wav, dir.join("chromium")).unwrap();
    let page = |u: &str, conv: &str| {
        format!("http://{http}/?userid={u}&clientid=tab&conversation={conv}&autojoin=1&raw=1&members=ann,ben,cat")
    };
    let p1 = b.open(&page("ann", "blue"));
    // Ben's network blocks UDP: his page keeps only the TCP candidate.
    let p2 = b.open(&(page("ben", "blue") + "&transport=tcp"));
    let p3 = b.open(&page("cat", "green"));

    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let states: Vec<Value> = [&p1, &p2, &p3]
            .iter()
            .map(|p| b.eval(p, "window.beep && window.beep.state"))
            .collect();
        if states.iter().all(|s| s == "joined") {
            break;
        }
        let errors: Vec<Value> = [&p1, &p2, &p3]
            .iter()
            .map(|p| b.eval(p, "window.beep && window.beep.error"))
            .collect();
        assert!(errors.iter().all(Value::is_null), "page error: {errors:?}");
        assert!(
            Instant::now() < end,
            "pages did not join within 30 s: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        metric(http, "beep_sfu_peers_connected "),
        Some(3.0),
        "the server reports the three peers connected"
    );

    // Both pages in "blue" receive the other's tone, with a level above zero,
    // and the count keeps growing.
    let stats = |b: &mut Browser, p: &str| b.eval(p, "JSON.stringify(window.beep.stats)");
    let parse = |v: Value| -> Value { serde_json::from_str(v.as_str().unwrap_or("{}")).unwrap() };
    let end = Instant::now() + Duration::from_secs(30);
    let mut first: Option<(u64, u64)> = None;
    loop {
        let s1 = parse(stats(&mut b, &p1));
        let s2 = parse(stats(&mut b, &p2));
        let level = |s: &Value| {
            s["inbound"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|i| i["level"].as_f64().unwrap_or(0.0))
                        .fold(0.0, f64::max)
                })
                .unwrap_or(0.0)
        };
        let (r1, r2) = (
            s1["received"].as_u64().unwrap_or(0),
            s2["received"].as_u64().unwrap_or(0),
        );
        if r1 > 100 && r2 > 100 && level(&s1) > 0.01 && level(&s2) > 0.01 {
            match first {
                None => first = Some((r1, r2)),
                Some((f1, f2)) if r1 > f1 + 20 && r2 > f2 + 20 => break,
                _ => {}
            }
        }
        assert!(
            Instant::now() < end,
            "blue pages did not receive audio: {s1} {s2}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Ben reached the server over ICE-TCP, Ann over UDP.
    assert_eq!(
        parse(stats(&mut b, &p2))["transport"],
        "tcp",
        "ben is on TCP"
    );
    assert_eq!(
        parse(stats(&mut b, &p1))["transport"],
        "udp",
        "ann stays on UDP"
    );
    assert!(metric(http, "beep_sfu_tcp_connections ").unwrap_or(0.0) >= 1.0);
    // Chromium offers RED and the answer carries it. Each page then sends
    // RED (the bites below decode to the tone: the core unwrapped it) and
    // is sent RED (its level above shows it decodes it). Chromium's
    // getStats names the decoded codec, audio/opus, for a RED stream, so
    // the server's counters are what tell RED went both ways.
    for p in [&p1, &p2] {
        let answer = b.eval(p, "window.beep.pc.remoteDescription.sdp");
        assert!(
            answer.as_str().unwrap_or("").contains(" red/48000/2"),
            "the answer carries RED: {answer}"
        );
    }
    let received: u64 = [&p1, &p2]
        .iter()
        .map(|p| parse(stats(&mut b, p))["received"].as_u64().unwrap_or(0))
        .sum();
    let count = |name: &str| metric(http, &format!("beep_sfu_{name}_total ")).unwrap_or(0.0);
    let end = Instant::now() + Duration::from_secs(5);
    while count("red_packets_written") < received as f64 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        count("red_packets_written") >= received as f64,
        "every packet the pages received was sent as RED: {} of {received}",
        count("red_packets_written")
    );
    assert!(
        count("red_packets_in") > 100.0,
        "the pages send RED: {}",
        count("red_packets_in")
    );
    // Every packet names its speaker by CSRC: each blue page sees its mate's
    // CSRC through getContributingSources(), never its own user's, and the
    // page names the speaker through the same rule (WebCrypto SHA-256).
    let csrc = beep_sfu::sfu::speaker_csrc;
    for (p, mate, me) in [(&p1, "ben", "ann"), (&p2, "ann", "ben")] {
        let seen = b.eval(p, "JSON.stringify(window.beep.csrcs)");
        let seen: Vec<u64> = serde_json::from_str(seen.as_str().unwrap_or("[]")).unwrap();
        assert!(
            seen.contains(&u64::from(csrc(mate))),
            "{me} sees {mate}'s CSRC: {seen:?}"
        );
        assert!(
            !seen.contains(&u64::from(csrc(me))),
            "{me} never sees its own CSRC"
        );
        let s = parse(stats(&mut b, p));
        let named = s["inbound"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["speaker"] == mate));
        assert!(named, "{me}'s page names {mate} as speaking: {s}");
    }
    // BEEP_SFU_SCREENSHOT=file.png saves what the first page shows.
    if let Ok(path) = std::env::var("BEEP_SFU_SCREENSHOT") {
        b.call(
            Some(&p1),
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 900, "height": 760, "deviceScaleFactor": 1, "mobile": false}),
        );
        std::thread::sleep(Duration::from_millis(1200));
        let shot = b.call(
            Some(&p1),
            "Page.captureScreenshot",
            json!({"format": "png"}),
        );
        let png = base64_decode(shot["data"].as_str().unwrap());
        std::fs::write(path, png).unwrap();
    }
    // The page alone in "green" sends but hears nothing.
    let s3 = parse(stats(&mut b, &p3));
    assert!(
        s3["sent"].as_u64().unwrap_or(0) > 50,
        "green page sends: {s3}"
    );
    assert_eq!(
        s3["received"].as_u64(),
        Some(0),
        "green page hears nothing from blue: {s3}"
    );
    assert!(metric(http, "beep_sfu_forwarded_packets_total ").unwrap_or(0.0) > 200.0);
    drop(b);
    assert!(server.shutdown());

    // What the browsers said became bites (finished at shutdown at the
    // latest): real Opus from Chromium that decodes to the 440 Hz tone.
    let blue: Vec<std::path::PathBuf> = std::fs::read_dir(dir.join("bites").join("blue"))
        .expect("bites of conversation blue")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "ogg"))
        .collect();
    for user in ["ann", "ben"] {
        let mine: Vec<_> = blue
            .iter()
            .filter(|p| p.to_string_lossy().contains(&format!("-{user}-")))
            .collect();
        assert!(!mine.is_empty(), "a bite of {user}: {blue:?}");
        let (secs, hz) =
            mine.iter()
                .map(|p| decode(p))
                .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
        assert!(
            secs >= 1.0,
            "{user}'s longest bite decodes to {secs:.2} s of audio"
        );
        assert!(
            (400.0..480.0).contains(&hz),
            "{user}'s bite is the 440 Hz tone: {hz:.0} Hz"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').map(val).collect();
    bytes
        .chunks(4)
        .flat_map(|c| {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, v)| acc | u32::from(*v) << (18 - 6 * i));
            let out = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.into_iter().take(c.len().saturating_sub(1))
        })
        .collect()
}
