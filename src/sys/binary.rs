//! Reading the publisher's binary caches (`hash-cache`, `tree-edges`, `status-heads`): a
//! magic line naming the format, then fixed-width little-endian fields. Every read is
//! checked, so a torn or foreign file reads as `None`, never as wrong values.

/// What is left of a cache file to read.
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// The records after `magic`; `None` for a file of another format.
    pub fn after(bytes: &'a [u8], magic: &[u8]) -> Option<Self> {
        bytes.strip_prefix(magic).map(Self)
    }

    /// Whether every byte was read (a whole file ends exactly after its last record).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many bytes are left.
    pub fn remaining(&self) -> usize {
        self.0.len()
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    pub fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_in_order_and_a_short_file_reads_none() {
        let mut bytes = b"magic\n".to_vec();
        bytes.extend_from_slice(&7u16.to_le_bytes());
        bytes.extend_from_slice(&8u32.to_le_bytes());
        bytes.extend_from_slice(&9u64.to_le_bytes());
        bytes.extend_from_slice(b"ab");
        let mut r = Reader::after(&bytes, b"magic\n").unwrap();
        assert_eq!((r.u16(), r.u32(), r.u64()), (Some(7), Some(8), Some(9)));
        assert_eq!(r.bytes(2), Some(b"ab".as_slice()));
        assert!(r.is_empty());
        assert_eq!(r.u16(), None, "nothing left");
        let mut short = Reader::after(&bytes[..bytes.len() - 3], b"magic\n").unwrap();
        assert_eq!(short.u16(), Some(7));
        assert_eq!(short.u32(), Some(8));
        assert_eq!(short.u64(), None, "cut short");
        assert!(Reader::after(&bytes, b"other\n").is_none());
    }
}
