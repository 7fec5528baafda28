//! What the core must know of Opus itself: its 48 kHz RTP clock, the usual
//! frame length, and a packet's duration from its TOC byte (RFC 6716). The
//! Ogg file format lives with the sink (`sink::ogg_opus`), off the loop.

/// Opus's RTP clock rate and sample rate: 48 kHz whatever the codec bandwidth.
pub const CLOCK_RATE: u32 = 48_000;
/// RTP ticks (samples) per millisecond.
pub const TICKS_PER_MS: u64 = CLOCK_RATE as u64 / 1000;
/// One 20 ms frame, the usual Opus packet, in RTP ticks.
pub const FRAME_TICKS: u32 = 960;

/// One Opus packet and its RTP timestamp relative to the first packet.
#[derive(Debug, Clone, Copy)]
pub struct TimedPacket<'a> {
    /// 48 kHz ticks since the first packet of the file.
    pub offset: u64,
    /// The Opus packet.
    pub data: &'a [u8],
}

/// Longest Opus packet that carries no audio: a TOC byte and at most one
/// more, which is what libopus emits for a frame in discontinuous
/// transmission (DTX) and what a decoder treats as a lost frame.
pub const DTX_MAX_BYTES: usize = 2;

/// The RFC 6464 level a packet counts at for speaker selection and bites: a
/// DTX frame is silence whatever level it claims (or when it has none, which
/// would otherwise count as moderately loud).
pub fn heard_level(level: Option<i8>, payload: &[u8]) -> Option<i8> {
    if payload.len() <= DTX_MAX_BYTES {
        Some(-127)
    } else {
        level
    }
}

/// Duration of an Opus packet in 48 kHz samples, from its TOC byte
/// (RFC 6716 section 3.1). `None` for an empty or malformed packet.
pub fn packet_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    let frame: u32 = match config {
        0..=11 => [480, 960, 1920, 2880][(config % 4) as usize], // SILK: 10/20/40/60 ms
        12..=15 => [480, 960][(config % 2) as usize],            // Hybrid: 10/20 ms
        _ => [120, 240, 480, 960][(config % 4) as usize],        // CELT: 2.5/5/10/20 ms
    };
    let frames: u32 = match toc & 0x3 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3f),
    };
    let total = frame * frames;
    // RFC 6716: a packet holds at most 120 ms.
    (frames > 0 && total <= 5760).then_some(total)
}

/// True if the packet's TOC says stereo.
pub fn is_stereo(packet: &[u8]) -> bool {
    packet.first().is_some_and(|t| t & 0x4 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toc_durations() {
        assert_eq!(packet_samples(&[0xFC]), Some(960)); // CELT FB 20 ms, 1 frame
        assert_eq!(packet_samples(&[0x78]), Some(960)); // config 15 hybrid FB 20 ms
        assert_eq!(packet_samples(&[0x08]), Some(960)); // SILK NB 20 ms
        assert_eq!(packet_samples(&[0xFD]), Some(1920)); // two 20 ms frames
        assert_eq!(packet_samples(&[0xFF, 0x03]), Some(2880)); // code 3, three frames
        assert_eq!(packet_samples(&[0xFF, 0x00]), None);
        assert_eq!(packet_samples(&[0xFF, 0x3f]), None); // 63 frames: too long
        assert_eq!(packet_samples(&[]), None);
    }
}
