//! The runs the generator makes: one measured run, a ramp that adds
//! participants step by step, and the bare relay's floor for comparison.

use super::*;

pub(super) fn run(a: &RunArgs) -> Result<Outcome, String> {
    let mut d = Driver::new()?;
    let mut ps = Vec::new();
    let idle_rss = a.rss();
    let tag = lifecycle::run_tag();
    add_participants(&mut d, &mut ps, a, a.shape.participants, &tag)?;
    let o = measure(&mut d, &mut ps, a, idle_rss);
    lifecycle::goodbye(&mut d, &mut ps);
    o
}

pub(super) fn ramp(a: &RunArgs, step: usize, max: usize) -> Result<(), String> {
    let mut d = Driver::new()?;
    let mut ps: Vec<WebRtcParticipant> = Vec::new();
    let idle_rss = a.rss();
    let mut results = Vec::new();
    let mut last_good = None;
    let tag = lifecycle::run_tag();
    while ps.len() + step <= max {
        let mut step_args = a.clone();
        step_args.shape.participants = ps.len() + step;
        add_participants(&mut d, &mut ps, &step_args, step, &tag)?;
        let o = measure(&mut d, &mut ps, &step_args, idle_rss)?;
        eprintln!(
            "P={:5}  out {:8.0} pps  cpu {:5.1}%  loss {:6.3}%  p99 {:6.2} ms",
            o.participants,
            o.pps_out,
            o.cpu_percent.unwrap_or(0.0),
            o.loss_percent,
            o.latency_ms_p99
        );
        let good = o.loss_percent <= 0.5
            && o.latency_ms_p99 <= 20.0
            && o.cpu_percent.unwrap_or(0.0) <= 95.0;
        results.push(o.clone());
        if !good {
            break;
        }
        last_good = Some(o.participants);
    }
    lifecycle::goodbye(&mut d, &mut ps);
    report(&results, a.shape.json.as_deref());
    println!(
        "last good P: {}",
        last_good.map(|p| p.to_string()).unwrap_or("none".into())
    );
    Ok(())
}

/// Signals, connects and joins `n` more participants, one at a time.
fn add_participants(
    d: &mut Driver,
    ps: &mut Vec<WebRtcParticipant>,
    a: &RunArgs,
    n: usize,
    tag: &str,
) -> Result<(), String> {
    let slots = a
        .slots
        .unwrap_or(a.shape.room_size.saturating_sub(1).max(1));
    let talk = voice::voice_fn(&a.shape);
    for _ in 0..n {
        let i = ps.len();
        let room = i / a.shape.room_size.max(1);
        let user = format!("load-{tag}-u{i}");
        let tcp = (i as f64) < a.tcp_share.clamp(0.0, 1.0) * a.shape.participants as f64;
        let mut p =
            WebRtcParticipant::signal(i as u32, a.http_of(i), &user, slots, a.shape.bind_ip, tcp)
                .map_err(|e| format!("participant {i}: {e}"))?;
        p.placement = a.placement();
        d.register(&mut p, i)?;
        ps.push(p);
        // Keep everyone flowing while this one connects.
        let end = Instant::now() + Duration::from_secs(10);
        while ps[i].connected_at.is_none() && Instant::now() < end {
            let until = Instant::now() + Duration::from_millis(2);
            d.drive(ps, until, &talk);
            // Let a fresh participant's handshake progress between phases.
            ps[i].on_tick(d.epoch, None, Voice::Quiet);
        }
        if ps[i].connected_at.is_none() {
            return Err(format!("participant {i} did not connect within 10 s"));
        }
        WebRtcParticipant::join(
            a.http_of(i),
            &user,
            i as u32,
            &format!("load-{tag}-room-{room}"),
        )
        .map_err(|e| format!("participant {i}: {e}"))?;
    }
    Ok(())
}

pub(super) fn measure(
    d: &mut Driver,
    ps: &mut [WebRtcParticipant],
    a: &RunArgs,
    idle_rss: Option<u64>,
) -> Result<Outcome, String> {
    let talk = voice::voice_fn(&a.shape);
    let warm = Instant::now() + Duration::from_secs(a.shape.warmup);
    d.drive(ps, warm, &talk);
    for p in ps.iter_mut() {
        p.tally = Tally::default();
    }
    let start = Instant::now();
    let end = start + Duration::from_secs(a.shape.duration);
    d.window = Some(Window {
        from_ns: d.ns(start),
        to_ns: d.ns(end),
    });
    let cpu0 = a.cpu();
    let gen0 = probe::cpu_seconds(std::process::id());
    let in0 = a.metric("beep_sfu_rtp_packets_in_total");
    let out0 = a.metric("beep_sfu_forwarded_packets_total");
    let relay0 = a.metric("beep_sfu_relay_packets_in_total");
    d.drive(ps, end, &talk);
    let cpu1 = a.cpu();
    let gen1 = probe::cpu_seconds(std::process::id());
    let in1 = a.metric("beep_sfu_rtp_packets_in_total");
    let out1 = a.metric("beep_sfu_forwarded_packets_total");
    let relay1 = a.metric("beep_sfu_relay_packets_in_total");
    let elapsed = start.elapsed().as_secs_f64();
    // Let packets sent at the end of the window arrive.
    d.drive(ps, Instant::now() + Duration::from_millis(500), &talk);
    d.window = None;
    let rss = a.rss();

    let mut setup: Vec<f64> = ps
        .iter()
        .filter_map(|p| {
            p.connected_at
                .map(|c| (c - p.started).as_secs_f64() * 1000.0)
        })
        .collect();
    setup.sort_by(f64::total_cmp);
    let hearers = a
        .slots
        .unwrap_or(a.shape.room_size.saturating_sub(1))
        .min(a.shape.room_size.saturating_sub(1));
    let forwarded = out1.zip(out0).map(|(b, a)| b - a).unwrap_or(0.0);
    let cpu = cpu1.zip(cpu0).map(|(b, a)| b - a);
    let mut o = summarise(
        "beep-sfu",
        ps.iter_mut().map(|p| p.tally.clone()).collect(),
        &a.shape,
        ps.len(),
        hearers,
        room_sizes(ps.len(), a.shape.room_size),
        elapsed,
        (in1.zip(in0).map(|(b, a)| b - a).unwrap_or(0.0), forwarded),
        cpu,
        Some(&setup),
        rss.zip(idle_rss)
            .map(|(r, i)| r.saturating_sub(i) as f64 / 1024.0 / ps.len().max(1) as f64),
    );
    o.generator_cpu_percent = gen1.zip(gen0).map(|(b, a)| (b - a) / elapsed * 100.0);
    o.rss_kib = rss.map(|r| r as f64 / 1024.0);
    if a.server.len() > 1 {
        let (mut cross, mut all): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
        for p in ps.iter() {
            cross.extend_from_slice(&p.tally.cross_latencies_us);
            all.extend_from_slice(&p.tally.latencies_us);
        }
        let mut same = multiset_minus(all, &cross);
        cross.sort_unstable();
        same.sort_unstable();
        let p = |v: &[u32]| (!v.is_empty()).then(|| (percentile(v, 0.5), percentile(v, 0.99)));
        o.cross_ms = p(&cross);
        o.same_ms = p(&same);
        o.relay_pps_in = relay1.zip(relay0).map(|(b, a)| (b - a) / elapsed);
    }
    Ok(o)
}

pub(super) fn baseline(
    relay: SocketAddr,
    relay_pid: Option<u32>,
    shape: &Shape,
) -> Result<Outcome, String> {
    let mut d = Driver::new()?;
    let mut ps = Vec::new();
    for i in 0..shape.participants {
        let room = (i / shape.room_size.max(1)) as u32;
        let mut p =
            UdpParticipant::new(i as u32, room, relay, shape.bind_ip).map_err(|e| e.to_string())?;
        d.register(&mut p, i)?;
        ps.push(p);
    }
    let talk = voice::voice_fn(shape);
    d.drive(
        &mut ps,
        Instant::now() + Duration::from_secs(shape.warmup),
        &talk,
    );
    for p in ps.iter_mut() {
        p.tally = Tally::default();
    }
    let start = Instant::now();
    let end = start + Duration::from_secs(shape.duration);
    d.window = Some(Window {
        from_ns: d.ns(start),
        to_ns: d.ns(end),
    });
    let cpu0 = relay_pid.and_then(probe::cpu_seconds);
    let gen0 = probe::cpu_seconds(std::process::id());
    d.drive(&mut ps, end, &talk);
    let cpu1 = relay_pid.and_then(probe::cpu_seconds);
    let gen1 = probe::cpu_seconds(std::process::id());
    let elapsed = start.elapsed().as_secs_f64();
    d.drive(&mut ps, Instant::now() + Duration::from_millis(500), &talk);
    for p in &ps {
        p.leave();
    }
    let tallies: Vec<Tally> = ps.iter().map(|p| p.tally.clone()).collect();
    let sent: f64 = tallies.iter().map(|t| t.sent_in_window as f64).sum();
    let received: f64 = tallies.iter().map(|t| t.received_in_window as f64).sum();
    let mut o = summarise(
        "bare-udp-relay",
        tallies,
        shape,
        ps.len(),
        shape.room_size.saturating_sub(1),
        room_sizes(ps.len(), shape.room_size),
        elapsed,
        (sent, received),
        cpu1.zip(cpu0).map(|(b, a)| b - a),
        None,
        None,
    );
    o.generator_cpu_percent = gen1.zip(gen0).map(|(b, a)| (b - a) / elapsed * 100.0);
    Ok(o)
}
