//! Turning a finished bite's raw packets into what a transport carries: the
//! Ogg Opus file, and a split in two for a transport whose message limit
//! (NATS `max_payload`) the whole bite would exceed. Runs on the sink
//! thread, never on the media loop.

use crate::sfu::opus::TICKS_PER_MS;
use crate::sfu::{BiteAudio, FinishedBite};

use super::ogg_opus;

/// The bite's Ogg Opus file (RFC 7845) with a random stream serial.
pub fn to_ogg(audio: &BiteAudio) -> Vec<u8> {
    let packets: Vec<_> = audio.packets().collect();
    ogg_opus::encode(&packets, rand::random())
}

/// Two bites from one, split at the middle packet, the second starting when
/// its first packet did: for a transport that cannot take the whole. `None`
/// for a bite of one packet.
pub(crate) fn split(b: &FinishedBite) -> Option<(FinishedBite, FinishedBite)> {
    let n = b.audio.len() / 2;
    if n == 0 {
        return None;
    }
    let mut first = BiteAudio::default();
    let mut second = BiteAudio::default();
    let mut base = 0;
    for (i, p) in b.audio.packets().enumerate() {
        if i < n {
            first.push(p.offset, p.data);
        } else {
            if i == n {
                base = p.offset;
            }
            second.push(p.offset - base, p.data);
        }
    }
    let part = |audio: BiteAudio, start_unix_ms| FinishedBite {
        conversation: b.conversation.clone(),
        userid: b.userid.clone(),
        clientid: b.clientid.clone(),
        start_unix_ms,
        packets: audio.len(),
        duration_ms: audio.duration_ticks() / TICKS_PER_MS,
        audio,
    };
    Some((
        part(first, b.start_unix_ms),
        part(second, b.start_unix_ms + base / TICKS_PER_MS),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bite(start_unix_ms: u64, first_offset: u64, n: u32) -> FinishedBite {
        let mut audio = BiteAudio::default();
        for i in 0..n {
            audio.push(first_offset + u64::from(i) * 960, &[0xF8, i as u8]);
        }
        FinishedBite {
            conversation: "c".into(),
            userid: "u".into(),
            clientid: "d".into(),
            start_unix_ms,
            packets: audio.len(),
            duration_ms: audio.duration_ticks() / TICKS_PER_MS,
            audio,
        }
    }

    #[test]
    fn the_audio_round_trips_through_ogg() {
        let b = bite(0, 0, 3);
        let got: Vec<(u64, Vec<u8>)> = b
            .audio
            .packets()
            .map(|p| (p.offset, p.data.to_vec()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, vec![0xF8, 0]),
                (960, vec![0xF8, 1]),
                (1920, vec![0xF8, 2])
            ]
        );
        assert_eq!(&to_ogg(&b.audio)[..4], b"OggS");
    }

    #[test]
    fn a_split_keeps_every_packet_and_the_second_half_starts_later() {
        let b = bite(1_000, 0, 5);
        let (x, y) = split(&b).unwrap();
        assert_eq!((x.packets, y.packets), (2, 3));
        assert_eq!((x.start_unix_ms, y.start_unix_ms), (1_000, 1_040));
        assert_eq!((x.duration_ms, y.duration_ms), (40, 60));
        let second: Vec<(u64, Vec<u8>)> = y
            .audio
            .packets()
            .map(|p| (p.offset, p.data.to_vec()))
            .collect();
        assert_eq!(second[0], (0, vec![0xF8, 2]));
        let one = split(&x).unwrap().0;
        assert!(split(&one).is_none(), "one packet cannot split");
    }
}
