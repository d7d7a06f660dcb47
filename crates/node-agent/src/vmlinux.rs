//! `vmlinux` from a `bzImage`: Firecracker on x86_64 boots only an uncompressed ELF
//! kernel, while distributions ship compressed `bzImage`s (Debian's cloud kernel carries
//! an LZ4 payload). This module finds the payload through the boot protocol's setup
//! header (`payload_offset`/`payload_length`, protocol 2.08+), decompresses it (LZ4
//! legacy frames, gzip, zstd) and checks that the result is an x86_64 ELF executable.
//!
//! The LZ4 "legacy" framing the kernel uses (magic `0x184C2102`, then blocks of at most
//! 8 MiB, each prefixed by its compressed length) is read here by hand because no crate
//! reads that framing; the blocks themselves are decoded by `lz4_flex`. Gzip and zstd go
//! through `flate2` and `zstd`. Input is bounded: a corrupt or hostile image gives an
//! error naming what is wrong, never a panic or an unbounded allocation. This module
//! only transforms bytes; it must not touch the agent's state.

use std::io::Read;
use std::path::Path;

/// Largest kernel accepted (compressed input and decompressed output).
pub const MAX_KERNEL_BYTES: u64 = 512 << 20;
/// Block size of LZ4 legacy frames.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const XZ_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0];

/// Why a kernel could not be extracted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmlinuxError {
    /// Reading or writing a file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// Not a bzImage this can read.
    #[error("not a bzImage: {0}")]
    NotBzImage(String),
    /// The payload's compression is not supported.
    #[error("unsupported kernel payload compression: {0}")]
    Unsupported(String),
    /// The payload is corrupt.
    #[error("corrupt kernel payload: {0}")]
    Corrupt(String),
    /// The result is not an x86_64 ELF executable.
    #[error("decompressed payload is not an x86_64 ELF executable: {0}")]
    NotElf(String),
}

/// What [`extract`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// The ELF image.
    pub elf: Vec<u8>,
    /// The payload's compression (`lz4`, `gzip`, `zstd`).
    pub compression: &'static str,
}

/// Extracts the ELF `vmlinux` from the bytes of a `bzImage` (or returns an ELF input
/// unchanged).
pub fn extract(image: &[u8]) -> Result<Extracted, VmlinuxError> {
    if image.starts_with(b"\x7fELF") {
        check_elf(image)?;
        return Ok(Extracted {
            elf: image.to_vec(),
            compression: "none",
        });
    }
    let payload = payload(image)?;
    let (elf, compression) = if payload.starts_with(&LZ4_LEGACY_MAGIC) {
        (lz4_legacy(payload)?, "lz4")
    } else if payload.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(payload)
            .take(MAX_KERNEL_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| VmlinuxError::Corrupt(format!("gzip: {e}")))?;
        (out, "gzip")
    } else if payload.starts_with(&ZSTD_MAGIC) {
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(payload)
            .map_err(|e| VmlinuxError::Corrupt(format!("zstd: {e}")))?
            .take(MAX_KERNEL_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| VmlinuxError::Corrupt(format!("zstd: {e}")))?;
        (out, "zstd")
    } else if payload.starts_with(&XZ_MAGIC) {
        return Err(VmlinuxError::Unsupported(
            "xz (rebuild the kernel with CONFIG_KERNEL_LZ4, GZIP or ZSTD, or use its vmlinux)"
                .into(),
        ));
    } else {
        let head: String = payload.iter().take(6).map(|b| format!("{b:02x}")).collect();
        return Err(VmlinuxError::Unsupported(format!(
            "unknown payload magic {head}"
        )));
    };
    if elf.len() as u64 > MAX_KERNEL_BYTES {
        return Err(VmlinuxError::Corrupt(format!(
            "decompresses to more than {MAX_KERNEL_BYTES} bytes"
        )));
    }
    check_elf(&elf)?;
    Ok(Extracted { elf, compression })
}

/// Reads `input`, extracts, and writes the ELF to `out` (via a temporary file renamed
/// into place, fsync'd).
pub fn extract_file(input: &Path, out: &Path) -> Result<Extracted, VmlinuxError> {
    let io = |p: &Path, e: std::io::Error| VmlinuxError::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    let meta = std::fs::metadata(input).map_err(|e| io(input, e))?;
    if meta.len() > MAX_KERNEL_BYTES {
        return Err(VmlinuxError::NotBzImage(format!(
            "{} is {} bytes, more than {MAX_KERNEL_BYTES}",
            input.display(),
            meta.len()
        )));
    }
    let bytes = std::fs::read(input).map_err(|e| io(input, e))?;
    let x = extract(&bytes)?;
    let tmp = out.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&x.elf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, out)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(out, e)
    })?;
    Ok(x)
}

/// The compressed payload of a bzImage (boot protocol 2.08+).
fn payload(image: &[u8]) -> Result<&[u8], VmlinuxError> {
    let u32_at = |off: usize| -> Option<u32> {
        image
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err(VmlinuxError::NotBzImage(
            "no \"HdrS\" setup header magic at 0x202".into(),
        ));
    }
    let version = image
        .get(0x206..0x208)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0);
    if version < 0x0208 {
        return Err(VmlinuxError::NotBzImage(format!(
            "boot protocol {}.{:02} has no payload_offset (needs 2.08+)",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = match image.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => usize::from(n),
    };
    let (Some(offset), Some(length)) = (u32_at(0x248), u32_at(0x24c)) else {
        return Err(VmlinuxError::NotBzImage("truncated setup header".into()));
    };
    let start = (setup_sects + 1) * 512 + offset as usize;
    let end = start.saturating_add(length as usize);
    image.get(start..end).ok_or_else(|| {
        VmlinuxError::NotBzImage(format!(
            "payload {start}..{end} lies outside the {}-byte image",
            image.len()
        ))
    })
}

/// Decodes LZ4 legacy frames: magic, then `u32` LE compressed length + block, repeated;
/// a repeated magic starts another frame; the kernel appends the decompressed size as a
/// final `u32`, which is checked when present.
fn lz4_legacy(data: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut pos = 4; // after the first magic
    while pos + 4 <= data.len() {
        let word = [data[pos], data[pos + 1], data[pos + 2], data[pos + 3]];
        if word == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        let len = u32::from_le_bytes(word) as usize;
        let rest = data.len() - pos - 4;
        if len == 0 || len > rest {
            // The trailing size word (or padding): the end of the stream.
            if rest == 0 && u32::from_le_bytes(word) as usize != out.len() {
                return Err(VmlinuxError::Corrupt(format!(
                    "lz4: trailer says {} bytes, decoded {}",
                    u32::from_le_bytes(word),
                    out.len()
                )));
            }
            break;
        }
        let input = &data[pos + 4..pos + 4 + len];
        let n = lz4_flex::block::decompress_into(input, &mut block)
            .map_err(|e| VmlinuxError::Corrupt(format!("lz4 block at {pos}: {e}")))?;
        if (out.len() + n) as u64 > MAX_KERNEL_BYTES {
            return Err(VmlinuxError::Corrupt(format!(
                "lz4: decompresses to more than {MAX_KERNEL_BYTES} bytes"
            )));
        }
        out.extend_from_slice(&block[..n]);
        pos += 4 + len;
    }
    if out.is_empty() {
        return Err(VmlinuxError::Corrupt("lz4: no blocks".into()));
    }
    Ok(out)
}

/// An ELF64, little-endian, `ET_EXEC`, `EM_X86_64` image.
fn check_elf(elf: &[u8]) -> Result<(), VmlinuxError> {
    if elf.len() < 64 || !elf.starts_with(b"\x7fELF") {
        return Err(VmlinuxError::NotElf("no ELF magic".into()));
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err(VmlinuxError::NotElf(
            "not a 64-bit little-endian ELF".into(),
        ));
    }
    let e_type = u16::from_le_bytes([elf[16], elf[17]]);
    let e_machine = u16::from_le_bytes([elf[18], elf[19]]);
    if e_type != 2 || e_machine != 62 {
        return Err(VmlinuxError::NotElf(format!(
            "e_type {e_type} e_machine {e_machine} (want 2 = EXEC, 62 = x86_64)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal x86_64 ELF executable header followed by `body`.
    fn fake_elf(body_len: usize) -> Vec<u8> {
        let mut e = vec![0u8; 64];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[16] = 2;
        e[18] = 62;
        e.extend((0..body_len).map(|i| (i % 251) as u8));
        e
    }

    /// A bzImage around `payload` (protocol 2.15, 4 setup sectors).
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512];
        img[0x1f1] = 4;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend(vec![0u8; 100]);
        img.extend_from_slice(payload);
        img.extend(vec![0u8; 33]);
        img
    }

    fn lz4_legacy_frame(data: &[u8]) -> Vec<u8> {
        let mut f = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let c = lz4_flex::block::compress(chunk);
            f.extend((c.len() as u32).to_le_bytes());
            f.extend(c);
        }
        f.extend((data.len() as u32).to_le_bytes());
        f
    }

    #[test]
    fn lz4_gzip_and_zstd_payloads_give_back_the_elf() {
        let elf = fake_elf(LZ4_LEGACY_BLOCK + 12345); // two lz4 blocks
        let lz4 = lz4_legacy_frame(&elf);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &elf).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&elf[..], 1).unwrap();
        for (payload, name) in [(lz4, "lz4"), (gz, "gzip"), (zst, "zstd")] {
            let x = extract(&bzimage(&payload)).unwrap();
            assert_eq!(x.compression, name);
            assert!(x.elf == elf, "{name}: output differs");
        }
    }

    #[test]
    fn bad_inputs_are_named_errors() {
        let elf = fake_elf(1000);
        assert!(matches!(
            extract(b"not a kernel at all"),
            Err(VmlinuxError::NotBzImage(_))
        ));
        let mut xz = XZ_MAGIC.to_vec();
        xz.extend([0u8; 32]);
        assert!(matches!(
            extract(&bzimage(&xz)),
            Err(VmlinuxError::Unsupported(m)) if m.starts_with("xz")
        ));
        // Payload pointing past the end.
        let mut img = bzimage(&lz4_legacy_frame(&elf));
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(extract(&img), Err(VmlinuxError::NotBzImage(_))));
        // Corrupt lz4 block.
        let mut frame = lz4_legacy_frame(&elf);
        for b in frame.iter_mut().skip(9).take(40) {
            *b = 0xff;
        }
        assert!(matches!(
            extract(&bzimage(&frame)),
            Err(VmlinuxError::Corrupt(_))
        ));
        // Decompresses to something that is not an x86_64 ELF.
        let mut arm = elf.clone();
        arm[18] = 183; // aarch64
        assert!(matches!(
            extract(&bzimage(&lz4_legacy_frame(&arm))),
            Err(VmlinuxError::NotElf(_))
        ));
        // Old boot protocol.
        let mut old = bzimage(&lz4_legacy_frame(&elf));
        old[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(matches!(extract(&old), Err(VmlinuxError::NotBzImage(m)) if m.contains("2.08")));
    }

    /// The installed Debian cloud kernel (a real bzImage with an LZ4 payload), when
    /// there is one.
    #[test]
    fn installed_cloud_kernel_extracts_to_an_x86_64_elf() {
        let kernel = std::fs::read_dir("/boot").ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
                })
                .max()
        });
        let Some(kernel) = kernel else {
            crate::testing::gate::skip_or_fail(
                "/boot/vmlinuz-*-cloud-amd64 (Debian package linux-image-cloud-amd64)",
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vmlinux");
        let x = extract_file(&kernel, &out).unwrap();
        let written = std::fs::read(&out).unwrap();
        assert_eq!(written.len(), x.elf.len());
        assert!(written.len() > 2 * std::fs::metadata(&kernel).unwrap().len() as usize);
        check_elf(&written).unwrap();
    }
}
