//! A downloaded NAR file checked against what the cache key *signed* (issue #23 items 5 and
//! 6): decompressed here, streaming, and hashed, stopping one byte past `NarSize`, before Nix
//! is handed it; and a `FileSize` refused when no compression of `NarSize` bytes could
//! produce it, before anything is downloaded.
//!
//! Why bento decompresses itself: `FileHash`/`FileSize` are outside the signature, so a
//! server can pair a signed narinfo with any file; Nix unpacks into the store first and
//! compares `NarHash` after, so a 99 KB zstd bomb wrote gigabytes into the store before it was
//! refused. Here it costs at most `NarSize + 1` bytes of hashing, in memory, and no disk.
//! The decoders are pure Rust (`ruzstd`, `lzma-rs`): no C build. `zstd` is what bento's own
//! export writes, `xz` is `nix copy`'s default, `none` is plain; `bzip2` (the oldest caches')
//! is refused by name: no bento export writes it, and its pure-Rust decoder
//! (`libbz2-rs-sys`) took 24 s to build here, against 6 s for `lzma-rs` and 43 s for
//! `ruzstd` (2 shared cores, `cargo build --timings`); the C `zstd` crate would add a C build.
//!
//! Invariant: [`check`] succeeds only when the file decompresses, as one stream with nothing
//! after it, to exactly `NarSize` bytes hashing to `NarHash`.

use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::protocol::narinfo::{nix32, NarInfo};

/// Slack for headers, block framing and small inputs in [`max_file_size`]: a compressed
/// file is never longer than its input plus 1/64 of it plus this.
const FRAMING_SLACK: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("the narinfo says Compression {compression:?} but its URL ends in {ext:?}")]
    Mismatch { compression: String, ext: String },
    #[error("Compression {0:?} is not one bento can check (zstd, xz, none)")]
    Unknown(String),
    #[error("FileSize {file_size} is more than compressing NarSize {nar_size} bytes with {compression} can produce (at most {bound}); refusing to download it")]
    FileTooLarge {
        file_size: u64,
        nar_size: u64,
        compression: String,
        bound: u64,
    },
    #[error("decompressed, it is larger than the signed NarSize {0}; stopped there")]
    TooLong(u64),
    #[error("decompressed, it is {got} bytes, the signed NarSize is {want}")]
    Size { got: u64, want: u64 },
    #[error("decompressed, it hashes to {got}, the signed NarHash is {want}")]
    Hash { got: String, want: String },
    #[error("it does not decompress as {compression}: {message}")]
    Corrupt {
        compression: String,
        message: String,
    },
    #[error("{compression} data is followed by {0} more byte(s)", compression = .1)]
    Trailing(u64, String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The compressions bento decodes, by the narinfo's `Compression` word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    None,
    Zstd,
    Xz,
}

impl Codec {
    fn of(info: &NarInfo) -> Result<Self, NarError> {
        let codec = match info.compression.as_str() {
            "none" => Codec::None,
            "zstd" => Codec::Zstd,
            "xz" => Codec::Xz,
            other => return Err(NarError::Unknown(other.to_owned())),
        };
        let ext = info
            .url
            .rsplit_once(".nar")
            .map_or("", |(_, ext)| ext)
            .to_owned();
        let expected = match codec {
            Codec::None => "",
            Codec::Zstd => ".zst",
            Codec::Xz => ".xz",
        };
        if ext != expected {
            return Err(NarError::Mismatch {
                compression: info.compression.clone(),
                ext,
            });
        }
        Ok(codec)
    }
}

/// The largest file compressing `nar_size` bytes can give. Uncompressed: the size itself.
/// Compressed, the worst case is incompressible input stored as it is, plus framing: zstd
/// adds at most 1/256 of the input plus 3 bytes per 128 KiB block (`ZSTD_compressBound`), xz
/// 3 bytes per 64 KiB LZMA2 chunk plus headers, index and footer (about 100 bytes). The
/// bound, `nar_size + nar_size / 64 + 64 KiB`, is above both (and above bzip2's documented
/// 1% + 600 bytes); anything beyond it is not a compressed NAR of that size.
pub fn max_file_size(info: &NarInfo) -> Result<u64, NarError> {
    let n = info.nar_size;
    Ok(match Codec::of(info)? {
        Codec::None => n,
        _ => n.saturating_add(n / 64).saturating_add(FRAMING_SLACK),
    })
}

/// Refuses a narinfo whose `FileSize` no compression of its `NarSize` could produce.
pub fn check_file_size(info: &NarInfo, file_size: u64) -> Result<(), NarError> {
    let bound = max_file_size(info)?;
    if file_size > bound {
        return Err(NarError::FileTooLarge {
            file_size,
            nar_size: info.nar_size,
            compression: info.compression.clone(),
            bound,
        });
    }
    Ok(())
}

/// Hashes what it is given, refusing to take more than `limit` bytes.
struct Capped {
    hasher: Sha256,
    taken: u64,
    limit: u64,
    over: bool,
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.taken + buf.len() as u64 > self.limit {
            self.over = true;
            return Err(io::Error::other("over NarSize"));
        }
        self.taken += buf.len() as u64;
        self.hasher.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decompresses the NAR file at `file` and checks it against the narinfo's signed `NarSize`
/// and `NarHash`, never producing more than `NarSize + 1` bytes.
pub fn check(info: &NarInfo, file: &Path) -> Result<(), NarError> {
    let codec = Codec::of(info)?;
    let mut input = BufReader::new(std::fs::File::open(file)?);
    let mut sink = Capped {
        hasher: Sha256::new(),
        taken: 0,
        limit: info.nar_size,
        over: false,
    };
    let result = decode(codec, &mut input, &mut sink);
    if sink.over {
        return Err(NarError::TooLong(info.nar_size));
    }
    result.map_err(|message| NarError::Corrupt {
        compression: info.compression.clone(),
        message,
    })?;
    let rest = io::copy(&mut input, &mut io::sink())?;
    if rest > 0 {
        return Err(NarError::Trailing(rest, info.compression.clone()));
    }
    if sink.taken != info.nar_size {
        return Err(NarError::Size {
            got: sink.taken,
            want: info.nar_size,
        });
    }
    let digest: [u8; 32] = sink.hasher.finalize().into();
    if !same_hash(&info.nar_hash, &digest) {
        return Err(NarError::Hash {
            got: format!("sha256:{}", nix32(&digest)),
            want: info.nar_hash.clone(),
        });
    }
    Ok(())
}

/// Runs the decoder of `codec` from `input` into `out`; the error as text.
fn decode<R: BufRead>(codec: Codec, input: &mut R, out: &mut Capped) -> Result<(), String> {
    match codec {
        Codec::None => io::copy(input, out).map(drop).map_err(|e| e.to_string()),
        Codec::Zstd => {
            // Frames may follow one another (zstd concatenates them), and Nix would unpack
            // them all: every frame counts toward NarSize.
            while !input.fill_buf().map_err(|e| e.to_string())?.is_empty() {
                let mut frame = ruzstd::decoding::StreamingDecoder::new(&mut *input)
                    .map_err(|e| e.to_string())?;
                io::copy(&mut frame, out).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        Codec::Xz => lzma_rs::xz_decompress(input, out).map_err(|e| e.to_string()),
    }
}

/// `NarHash` as Nix writes it (`sha256:` and nix32), or in the base-16 form of old caches.
fn same_hash(nar_hash: &str, digest: &[u8; 32]) -> bool {
    let Some(text) = nar_hash.strip_prefix("sha256:") else {
        return false;
    };
    match text.len() {
        52 => text == nix32(digest),
        64 => text.eq_ignore_ascii_case(&hex::encode(digest)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(compression: &str, url: &str, nar: &[u8]) -> NarInfo {
        let digest: [u8; 32] = Sha256::digest(nar).into();
        NarInfo {
            store_path: "/nix/store/00000000000000000000000000000000-x".into(),
            url: url.into(),
            compression: compression.into(),
            file_hash: None,
            file_size: None,
            nar_hash: format!("sha256:{}", nix32(&digest)),
            nar_size: nar.len() as u64,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
        }
    }

    fn write(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join("nar");
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// A zstd frame of RLE blocks: `blocks` × 128 KiB of `byte` from 4 bytes per block.
    fn zstd_bomb(blocks: usize, byte: u8) -> Vec<u8> {
        let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38];
        for i in 0..blocks {
            let last = u32::from(i + 1 == blocks);
            let header = (128 * 1024) << 3 | 1 << 1 | last;
            out.extend_from_slice(&header.to_le_bytes()[..3]);
            out.push(byte);
        }
        out
    }

    #[test]
    fn each_compression_is_checked_against_the_signed_hash_and_size() {
        let t = tempfile::tempdir().unwrap();
        let nar = b"nix-archive-1 and what follows".repeat(100);
        let zst = ruzstd::encoding::compress_to_vec(
            &nar[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &nar[..], &mut xz).unwrap();
        for (c, url, file) in [
            ("none", "nar/x.nar", nar.clone()),
            ("zstd", "nar/x.nar.zst", zst),
            ("xz", "nar/x.nar.xz", xz),
        ] {
            let i = info(c, url, &nar);
            let p = write(t.path(), &file);
            check(&i, &p).unwrap_or_else(|e| panic!("{c}: {e}"));
            // Another NAR of the same size: its hash is refused.
            let mut other = i.clone();
            other.nar_hash = info(c, url, &[b'x'; 3000]).nar_hash;
            assert!(
                matches!(check(&other, &p), Err(NarError::Hash { .. })),
                "{c}"
            );
            // A NAR signed as shorter: refused at that length.
            let mut short = i.clone();
            short.nar_size -= 1;
            assert!(
                matches!(check(&short, &p), Err(NarError::TooLong(_))),
                "{c}"
            );
            // Trailing bytes after the stream.
            let mut longer = file.clone();
            longer.extend_from_slice(b"junk");
            let p = write(t.path(), &longer);
            assert!(check(&i, &p).is_err(), "{c}: trailing bytes accepted");
        }
    }

    #[test]
    fn a_decompression_bomb_stops_at_nar_size() {
        let t = tempfile::tempdir().unwrap();
        // 3 GiB of zeros in 96 KiB.
        let bomb = zstd_bomb(24 * 1024, 0);
        assert!(bomb.len() < 100 * 1024);
        let i = info("zstd", "nar/x.nar.zst", &[0u8; 4096]);
        let p = write(t.path(), &bomb);
        let started = std::time::Instant::now();
        assert!(matches!(check(&i, &p), Err(NarError::TooLong(4096))));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // The same zeros, as long as signed: accepted (the decoder reads these frames).
        let exact = zstd_bomb(1, 0);
        let i = info("zstd", "nar/x.nar.zst", &vec![0u8; 128 * 1024]);
        check(&i, &write(t.path(), &exact)).unwrap();
    }

    #[test]
    fn file_size_is_bounded_by_nar_size_and_compression() {
        let i = info("zstd", "nar/x.nar.zst", &[0u8; 2048]);
        check_file_size(&i, 2048 + 32 + 64 * 1024).unwrap();
        let err = check_file_size(&i, 2 << 30).unwrap_err().to_string();
        assert!(
            err.contains("FileSize 2147483648") && err.contains("NarSize 2048"),
            "{err}"
        );
        let none = info("none", "nar/x.nar", &[0u8; 2048]);
        check_file_size(&none, 2048).unwrap();
        assert!(check_file_size(&none, 2049).is_err());
        let odd = info("zstd", "nar/x.nar.xz", &[0u8; 1]);
        assert!(matches!(
            check_file_size(&odd, 1),
            Err(NarError::Mismatch { .. })
        ));
        let unknown = info("bzip2", "nar/x.nar.bz2", &[0u8; 1]);
        assert!(matches!(
            check_file_size(&unknown, 1),
            Err(NarError::Unknown(_))
        ));
    }
}
