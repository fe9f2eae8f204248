//! Test audio for listen probes: a small RIFF/WAV reader (PCM 16-bit only), channel
//! selection, and cutting the samples into the frames a session sends.
//!
//! Audio is read once, while the config is validated, and shared behind an `Arc` by every
//! run of the probe. Not here: resampling or transcoding — the file must already be in the
//! format the URL declares, and validation says so when it is not.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_tungstenite::tungstenite::Bytes;

/// Why a WAV file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a RIFF/WAVE file")]
    NotWave(PathBuf),
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("{path} is {what}; only uncompressed PCM 16-bit WAV is supported (convert with `sox in.wav -b 16 -e signed-integer out.wav`)")]
    Unsupported { path: PathBuf, what: String },
    #[error(
        "{path} has {channels} channel(s); channel {wanted} does not exist (channels count from 0)"
    )]
    NoSuchChannel {
        path: PathBuf,
        channels: u16,
        wanted: u16,
    },
    #[error("{0} holds no audio samples")]
    Empty(PathBuf),
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("{path} is {size} bytes, over the {MAX_AUDIO_BYTES} byte cap for test audio")]
    TooLarge { path: PathBuf, size: u64 },
}

/// Largest audio file read (about 17 minutes of 16 kHz mono): every run streams all of it,
/// and a device or a runaway file must not decide the agent's memory.
pub const MAX_AUDIO_BYTES: u64 = 32 * 1024 * 1024;
/// Largest `manifest.toml` read.
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// Read a regular file of at most `cap` bytes (a device such as `/dev/zero` or a FIFO is
/// refused before anything is read; the read itself stops at the cap too, in case the file
/// grows meanwhile).
fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, AudioError> {
    use std::io::Read as _;
    let io = |source| AudioError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(AudioError::NotAFile(path.to_path_buf()));
    }
    let too_large = |size| AudioError::TooLarge {
        path: path.to_path_buf(),
        size,
    };
    if meta.len() > cap {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .map_err(io)?
        .take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > cap {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// PCM 16-bit little-endian audio, interleaved, exactly as it is sent.
#[derive(Debug, Clone)]
pub struct Audio {
    /// Where it came from.
    pub path: PathBuf,
    /// Samples per second.
    pub sample_rate: u32,
    /// Channels in [`Audio::pcm`] (1 after picking a channel).
    pub channels: u16,
    /// Channels in the file itself.
    pub file_channels: u16,
    /// Interleaved s16le samples.
    pub pcm: Vec<u8>,
}

fn u16le(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}
fn u32le(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl Audio {
    /// Read a WAV file; with `channel`, keep only that channel (0-based) as mono.
    pub fn load(path: &Path, channel: Option<u16>) -> Result<Audio, AudioError> {
        let bytes = read_capped(path, MAX_AUDIO_BYTES)?;
        Audio::parse(path, &bytes, channel)
    }

    /// Parse WAV bytes (see [`Audio::load`]); `path` is only used in messages.
    pub fn parse(path: &Path, b: &[u8], channel: Option<u16>) -> Result<Audio, AudioError> {
        let p = || path.to_path_buf();
        let malformed = |what: &str| AudioError::Malformed {
            path: path.to_path_buf(),
            what: what.to_string(),
        };
        if b.len() < 12 || &b[0..4] != b"RIFF" || &b[8..12] != b"WAVE" {
            return Err(AudioError::NotWave(p()));
        }
        let mut at = 12;
        let mut fmt: Option<(u16, u16, u32, u16)> = None;
        let mut data: Option<&[u8]> = None;
        while at + 8 <= b.len() {
            let id = &b[at..at + 4];
            let len = u32le(b, at + 4).ok_or_else(|| malformed("truncated chunk header"))? as usize;
            let body_start = at + 8;
            // Streaming writers leave the data length at 0 or 0xFFFFFFFF: take what is there.
            let body_end = body_start.saturating_add(len).min(b.len());
            let body = &b[body_start..body_end];
            match id {
                b"fmt " => {
                    let tag = u16le(body, 0).ok_or_else(|| malformed("fmt chunk too short"))?;
                    let channels =
                        u16le(body, 2).ok_or_else(|| malformed("fmt chunk too short"))?;
                    let rate = u32le(body, 4).ok_or_else(|| malformed("fmt chunk too short"))?;
                    let bits = u16le(body, 14).ok_or_else(|| malformed("fmt chunk too short"))?;
                    // WAVE_FORMAT_EXTENSIBLE carries the real format in its sub-format GUID.
                    let tag = if tag == 0xFFFE {
                        u16le(body, 24).unwrap_or(0)
                    } else {
                        tag
                    };
                    fmt = Some((tag, channels, rate, bits));
                }
                b"data" => {
                    let body = if len == 0 || len == u32::MAX as usize {
                        &b[body_start..]
                    } else {
                        body
                    };
                    data = Some(body);
                    break;
                }
                _ => {}
            }
            // Chunks are padded to an even length.
            at = body_start.saturating_add(len).saturating_add(len & 1);
        }
        let (tag, channels, rate, bits) = fmt.ok_or_else(|| malformed("no fmt chunk"))?;
        let data = data.ok_or_else(|| malformed("no data chunk"))?;
        if tag != 1 {
            let what = match tag {
                3 => "IEEE float".to_string(),
                6 => "A-law".to_string(),
                7 => "µ-law".to_string(),
                t => format!("format tag {t}"),
            };
            return Err(AudioError::Unsupported { path: p(), what });
        }
        if bits != 16 {
            return Err(AudioError::Unsupported {
                path: p(),
                what: format!("{bits}-bit PCM"),
            });
        }
        if channels == 0 || rate == 0 {
            return Err(malformed("zero channels or sample rate"));
        }
        let frame = 2 * channels as usize;
        let whole = data.len() / frame * frame;
        let data = &data[..whole];
        if data.is_empty() {
            return Err(AudioError::Empty(p()));
        }
        let (pcm, out_channels) = match channel {
            None => (data.to_vec(), channels),
            Some(c) if c >= channels => {
                return Err(AudioError::NoSuchChannel {
                    path: p(),
                    channels,
                    wanted: c,
                });
            }
            Some(c) => {
                let off = 2 * c as usize;
                let mono: Vec<u8> = data
                    .chunks_exact(frame)
                    .flat_map(|f| [f[off], f[off + 1]])
                    .collect();
                (mono, 1)
            }
        };
        Ok(Audio {
            path: p(),
            sample_rate: rate,
            channels: out_channels,
            file_channels: channels,
            pcm,
        })
    }

    /// Bytes per second of the sent stream.
    pub fn byte_rate(&self) -> u64 {
        self.sample_rate as u64 * self.channels as u64 * 2
    }

    /// Length of the audio.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.pcm.len() as f64 / self.byte_rate() as f64)
    }

    /// Samples as i16 (all channels interleaved).
    pub fn samples(&self) -> impl Iterator<Item = i16> + '_ {
        self.pcm
            .chunks_exact(2)
            .map(|s| i16::from_le_bytes([s[0], s[1]]))
    }

    /// Cut lead-in silence + audio + tail silence into frames of `chunk` each. The last
    /// frame may be shorter; none is empty (an empty binary frame ends a Deepgram stream).
    pub fn frames(&self, chunk: Duration, lead_in: Duration, tail: Duration) -> Vec<Bytes> {
        let align = 2 * self.channels as usize;
        let bytes_for = |d: Duration| -> usize {
            let n = (d.as_secs_f64() * self.byte_rate() as f64).round() as usize;
            n / align * align
        };
        let chunk_bytes = bytes_for(chunk).max(align);
        let mut all = vec![0u8; bytes_for(lead_in)];
        all.extend_from_slice(&self.pcm);
        all.resize(all.len() + bytes_for(tail), 0);
        all.chunks(chunk_bytes)
            .filter(|c| !c.is_empty())
            .map(Bytes::copy_from_slice)
            .collect()
    }
}

/// Duration of `bytes` of s16le audio at `sample_rate` × `channels`.
pub fn bytes_duration(bytes: usize, sample_rate: u32, channels: u16) -> Duration {
    let rate = sample_rate as f64 * channels as f64 * 2.0;
    if rate <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(bytes as f64 / rate)
}

#[derive(serde::Deserialize)]
struct Manifest {
    #[serde(default)]
    utterance: Vec<Utterance>,
}

/// One entry of `manifest.toml` next to the audio files.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Utterance {
    /// File name, relative to the manifest.
    pub file: String,
    /// What is said in it.
    pub transcript: String,
}

/// The utterances listed in a `manifest.toml`.
pub fn read_manifest(path: &Path) -> Result<Vec<Utterance>, String> {
    let bytes = read_capped(path, MAX_MANIFEST_BYTES).map_err(|e| e.to_string())?;
    let text =
        String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    let m: Manifest =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message().trim()))?;
    Ok(m.utterance)
}

/// The transcript of `audio` from the `manifest.toml` in its directory, if listed there.
pub fn manifest_transcript(audio: &Path) -> Result<Option<String>, String> {
    let Some(dir) = audio.parent() else {
        return Ok(None);
    };
    let manifest = dir.join("manifest.toml");
    if !manifest.exists() {
        return Ok(None);
    }
    let name = audio
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok(read_manifest(&manifest)?
        .into_iter()
        .find(|u| u.file == name)
        .map(|u| u.transcript))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(channels: u16, rate: u32, bits: u16, tag: u16, samples: &[i16]) -> Vec<u8> {
        let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut b = Vec::new();
        b.extend_from_slice(b"RIFF");
        b.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        b.extend_from_slice(b"WAVEfmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&channels.to_le_bytes());
        b.extend_from_slice(&rate.to_le_bytes());
        b.extend_from_slice(&(rate * channels as u32 * 2).to_le_bytes());
        b.extend_from_slice(&(channels * 2).to_le_bytes());
        b.extend_from_slice(&bits.to_le_bytes());
        b.extend_from_slice(b"LIST");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(b"abc\0"); // odd length + pad byte
        b.extend_from_slice(b"data");
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(&data);
        b
    }

    #[test]
    fn parses_and_picks_channels() {
        let b = wav(2, 8000, 16, 1, &[1, -1, 2, -2, 3, -3]);
        let a = Audio::parse(Path::new("x.wav"), &b, None).unwrap();
        assert_eq!((a.sample_rate, a.channels, a.pcm.len()), (8000, 2, 12));
        let right = Audio::parse(Path::new("x.wav"), &b, Some(1)).unwrap();
        assert_eq!(right.samples().collect::<Vec<_>>(), vec![-1, -2, -3]);
        assert_eq!(right.channels, 1);
        assert!(matches!(
            Audio::parse(Path::new("x.wav"), &b, Some(2)),
            Err(AudioError::NoSuchChannel { .. })
        ));
    }

    #[test]
    fn rejects_what_it_cannot_send() {
        let p = Path::new("x.wav");
        assert!(matches!(
            Audio::parse(p, b"hello", None),
            Err(AudioError::NotWave(_))
        ));
        assert!(matches!(
            Audio::parse(p, &wav(1, 8000, 8, 1, &[1]), None),
            Err(AudioError::Unsupported { .. })
        ));
        assert!(matches!(
            Audio::parse(p, &wav(1, 8000, 16, 3, &[1]), None),
            Err(AudioError::Unsupported { .. })
        ));
        assert!(matches!(
            Audio::parse(p, &wav(1, 8000, 16, 1, &[]), None),
            Err(AudioError::Empty(_))
        ));
    }

    #[test]
    fn only_regular_files_under_the_cap_are_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Audio::load(Path::new("/dev/zero"), None),
            Err(AudioError::NotAFile(_))
        ));
        assert!(matches!(
            Audio::load(dir.path(), None),
            Err(AudioError::NotAFile(_))
        ));
        let big = dir.path().join("big.wav");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_AUDIO_BYTES + 1)
            .unwrap();
        let e = Audio::load(&big, None).unwrap_err();
        assert!(matches!(e, AudioError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("over the 33554432 byte cap"), "{e}");
        let ok = dir.path().join("ok.wav");
        std::fs::write(&ok, wav(1, 8000, 16, 1, &[1, 2])).unwrap();
        assert_eq!(Audio::load(&ok, None).unwrap().pcm.len(), 4);
    }

    #[test]
    fn frames_cover_everything_and_none_is_empty() {
        let samples: Vec<i16> = (0..16_050).map(|i| i as i16).collect();
        let a = Audio::parse(Path::new("x.wav"), &wav(1, 16_000, 16, 1, &samples), None).unwrap();
        let frames = a.frames(
            Duration::from_millis(100),
            Duration::from_millis(200),
            Duration::from_millis(50),
        );
        let total: usize = frames.iter().map(|f| f.len()).sum();
        assert_eq!(total, (16_050 + 3200 + 800) * 2);
        assert!(frames.iter().all(|f| !f.is_empty() && f.len() % 2 == 0));
        assert_eq!(frames[0].len(), 3200);
        assert!(frames[0].iter().all(|b| *b == 0), "lead-in is silence");
    }

    #[test]
    fn shipped_audio_matches_manifest() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/audio");
        let list = read_manifest(&dir.join("manifest.toml")).unwrap();
        assert!(list.len() >= 3);
        for u in list {
            let a = Audio::load(&dir.join(&u.file), None).unwrap();
            assert_eq!((a.sample_rate, a.channels), (16_000, 1), "{}", u.file);
            assert!(a.duration() > Duration::from_millis(500));
            assert_eq!(
                manifest_transcript(&dir.join(&u.file)).unwrap(),
                Some(u.transcript)
            );
        }
    }
}
