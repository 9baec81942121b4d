//! Manifest format 2's packs (issue #26): a tree's small files concatenated into one stored
//! object, so a version needs a few keys (directory entries in a chroot, requests on an
//! object store) where format 1 needs one per file, while a host still fetches only the
//! files it lacks, by range. A pack has no stored index: where each file lies follows from
//! the tree that names the pack (its files' sizes, in name order, each content once), so
//! the signed manifest commits to the layout too. Invariant: a file's bytes out of a pack are
//! used only once they hash to the digest its tree names (`PackIndex::verify`), so a wrong
//! or hostile pack costs a refused download, never a wrong file.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::protocol::listing::Digest;

/// Objects up to this size are packed; larger ones stay objects of their own (a range read
/// saves nothing on them, and a pack stays cheap to rewrite).
pub const PACKED_MAX: u64 = 64 * 1024;
/// Ranges closer than this are read as one: a few wasted bytes cost less than a request.
pub const COALESCE_GAP: u64 = 4 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("pack {pack}: the entry for {entry} hashes to {actual}")]
    EntryMismatch {
        pack: Digest,
        entry: Digest,
        actual: Digest,
    },
    #[error("pack {pack}: the bytes read do not cover the entry for {entry}")]
    ShortRead { pack: Digest, entry: Digest },
}

/// Where one object lies in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub sha256: Digest,
    pub offset: u64,
    pub size: u64,
}

impl PackEntry {
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.size
    }
}

/// Where each object of one pack lies, derived from the files it packs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackIndex {
    /// The pack's key: the sha256 of its whole bytes (the publisher's name for it; a host
    /// reading ranges never hashes the whole pack, it checks each entry).
    pub pack: Digest,
    /// The pack's length in bytes.
    pub size: u64,
    /// Sorted by `sha256`, each once.
    pub entries: Vec<PackEntry>,
}

impl PackIndex {
    /// The layout of the pack `pack` of `files` (digest, size), in the order given: each
    /// content once, where it first occurs, back to back. What [`PackWriter`] writes.
    pub fn layout(pack: Digest, files: &[(Digest, u64)]) -> PackIndex {
        let mut entries: BTreeMap<Digest, PackEntry> = BTreeMap::new();
        let mut offset = 0u64;
        for (sha256, size) in files {
            entries.entry(*sha256).or_insert_with(|| {
                let e = PackEntry {
                    sha256: *sha256,
                    offset,
                    size: *size,
                };
                offset = offset.saturating_add(*size);
                e
            });
        }
        PackIndex {
            pack,
            size: offset,
            entries: entries.into_values().collect(),
        }
    }

    pub fn find(&self, sha256: &Digest) -> Option<&PackEntry> {
        self.entries
            .binary_search_by(|e| e.sha256.cmp(sha256))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The byte ranges to read for the `wanted` objects this pack holds, in pack order,
    /// neighbours closer than `COALESCE_GAP` merged: the reads a host makes for what it lacks.
    pub fn ranges<'a>(&self, wanted: impl IntoIterator<Item = &'a Digest>) -> Vec<Range<u64>> {
        let mut want: Vec<Range<u64>> = wanted
            .into_iter()
            .filter_map(|d| self.find(d))
            .map(PackEntry::range)
            .collect();
        want.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::new();
        for r in want {
            match out.last_mut() {
                Some(last) if r.start <= last.end + COALESCE_GAP => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        out
    }

    /// The entry for `sha256` out of `bytes`, which were read from the pack at `at`, once its
    /// bytes hash to `sha256`.
    pub fn verify<'b>(
        &self,
        sha256: &Digest,
        at: u64,
        bytes: &'b [u8],
    ) -> Result<&'b [u8], PackError> {
        let short = || PackError::ShortRead {
            pack: self.pack,
            entry: *sha256,
        };
        let e = self.find(sha256).ok_or_else(short)?;
        let start = e.offset.checked_sub(at).ok_or_else(short)?;
        let slice = usize::try_from(start)
            .ok()
            .zip(usize::try_from(e.size).ok())
            .and_then(|(s, n)| bytes.get(s..s.checked_add(n)?))
            .ok_or_else(short)?;
        let actual = Digest::of(slice);
        if actual != *sha256 {
            return Err(PackError::EntryMismatch {
                pack: self.pack,
                entry: *sha256,
                actual,
            });
        }
        Ok(slice)
    }
}

/// Builds one pack from objects, each once, in the order given (the publisher gives a
/// tree's files in path order, so a host's reads of neighbouring files coalesce).
#[derive(Debug, Default)]
pub struct PackWriter {
    bytes: Vec<u8>,
    entries: BTreeMap<Digest, PackEntry>,
}

impl PackWriter {
    /// Adds an object; one already in the pack is not added again.
    pub fn add(&mut self, object: &[u8]) -> Digest {
        let sha256 = Digest::of(object);
        if !self.entries.contains_key(&sha256) {
            let entry = PackEntry {
                sha256,
                offset: self.bytes.len() as u64,
                size: object.len() as u64,
            };
            self.bytes.extend_from_slice(object);
            self.entries.insert(sha256, entry);
        }
        sha256
    }

    /// The pack's bytes and its index.
    pub fn finish(self) -> (Vec<u8>, PackIndex) {
        let index = PackIndex {
            pack: Digest::of(&self.bytes),
            size: self.bytes.len() as u64,
            entries: self.entries.into_values().collect(),
        };
        (self.bytes, index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(objects: &[&[u8]]) -> (Vec<u8>, PackIndex) {
        let mut w = PackWriter::default();
        for o in objects {
            w.add(o);
        }
        w.finish()
    }

    #[test]
    fn each_entry_is_read_back_verified_from_a_range() {
        let objects: [&[u8]; 3] = [b"alpha", b"bravo bravo", b"charlie"];
        let (pack, index) = packed(&objects);
        for o in objects {
            let d = Digest::of(o);
            let r = index.ranges([&d]);
            assert_eq!(r.len(), 1);
            let (start, end) = (r[0].start as usize, r[0].end as usize);
            assert_eq!(index.verify(&d, r[0].start, &pack[start..end]).unwrap(), o);
        }
    }

    #[test]
    fn a_duplicate_object_is_packed_once() {
        let (pack, index) = packed(&[b"same", b"same", b"other"]);
        assert_eq!(index.entries.len(), 2);
        assert_eq!(pack.len(), 9);
    }

    #[test]
    fn neighbouring_reads_coalesce_and_far_ones_do_not() {
        let big = vec![7u8; (COALESCE_GAP * 2) as usize];
        let (_, index) = packed(&[b"a", b"b", &big, b"c"]);
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        assert_eq!(index.ranges([&a, &b]), vec![0..2]);
        assert_eq!(
            index.ranges([&a, &c]).len(),
            2,
            "the large object lies between"
        );
        assert!(index.ranges([&Digest::of(b"not packed")]).is_empty());
    }

    #[test]
    fn a_tampered_entry_is_refused() {
        let (mut pack, index) = packed(&[b"alpha", b"bravo"]);
        let d = Digest::of(b"bravo");
        let e = *index.find(&d).unwrap();
        pack[e.offset as usize] ^= 1;
        assert!(matches!(
            index.verify(&d, 0, &pack),
            Err(PackError::EntryMismatch { .. })
        ));
        assert!(matches!(
            index.verify(&d, 0, &pack[..pack.len() - 1]),
            Err(PackError::ShortRead { .. })
        ));
    }

    #[test]
    fn the_layout_a_tree_implies_is_the_one_the_writer_wrote() {
        let objects: [&[u8]; 4] = [b"one", b"", b"three", b"one"];
        let (pack, written) = packed(&objects);
        let files: Vec<(Digest, u64)> = objects
            .iter()
            .map(|o| (Digest::of(o), o.len() as u64))
            .collect();
        assert_eq!(PackIndex::layout(Digest::of(&pack), &files), written);
        assert_eq!(written.size, pack.len() as u64);
    }
}
