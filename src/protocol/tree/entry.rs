//! [`Entry`]'s wire form, by hand: one flat object, `{"name", "kind": "file", "size",
//! "sha256", "executable"}` or `{"name", "kind": "tree", "sha256"}`, in that order. Derived,
//! serde's `flatten` of a tagged enum buffers every entry twice, and every publish parses
//! and writes a tree per host.

use serde::{Deserialize, Serialize};

use super::{Entry, Node};
use crate::protocol::listing::Digest;

impl Serialize for Entry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("name", &self.name)?;
        match &self.node {
            Node::File {
                size,
                sha256,
                executable,
            } => {
                m.serialize_entry("kind", "file")?;
                m.serialize_entry("size", size)?;
                m.serialize_entry("sha256", sha256)?;
                m.serialize_entry("executable", executable)?;
            }
            Node::Tree { sha256 } => {
                m.serialize_entry("kind", "tree")?;
                m.serialize_entry("sha256", sha256)?;
            }
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "lowercase")]
        enum Field {
            Name,
            Kind,
            Size,
            Sha256,
            Executable,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "lowercase")]
        enum Kind {
            File,
            Tree,
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a tree entry")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entry, A::Error> {
                use serde::de::Error;
                fn once<T, E: Error>(
                    slot: &mut Option<T>,
                    v: T,
                    field: &'static str,
                ) -> Result<(), E> {
                    match slot.replace(v) {
                        Some(_) => Err(E::duplicate_field(field)),
                        None => Ok(()),
                    }
                }
                let (mut name, mut kind, mut size, mut sha256, mut executable) =
                    (None, None, None, None, None);
                while let Some(key) = map.next_key::<Field>()? {
                    match key {
                        Field::Name => once(&mut name, map.next_value::<String>()?, "name")?,
                        Field::Kind => once(&mut kind, map.next_value::<Kind>()?, "kind")?,
                        Field::Size => once(&mut size, map.next_value::<u64>()?, "size")?,
                        Field::Sha256 => once(&mut sha256, map.next_value::<Digest>()?, "sha256")?,
                        Field::Executable => {
                            once(&mut executable, map.next_value::<bool>()?, "executable")?
                        }
                    }
                }
                let name = name.ok_or_else(|| A::Error::missing_field("name"))?;
                let sha256 = sha256.ok_or_else(|| A::Error::missing_field("sha256"))?;
                let node = match kind.ok_or_else(|| A::Error::missing_field("kind"))? {
                    Kind::File => Node::File {
                        size: size.ok_or_else(|| A::Error::missing_field("size"))?,
                        sha256,
                        executable: executable
                            .ok_or_else(|| A::Error::missing_field("executable"))?,
                    },
                    // A subdirectory has no size nor mode of its own.
                    Kind::Tree => match (size, executable) {
                        (None, None) => Node::Tree { sha256 },
                        (Some(_), _) => return Err(A::Error::unknown_field("size", TREE_FIELDS)),
                        (_, Some(_)) => {
                            return Err(A::Error::unknown_field("executable", TREE_FIELDS))
                        }
                    },
                };
                Ok(Entry { name, node })
            }
        }
        const TREE_FIELDS: &[&str] = &["name", "kind", "sha256"];
        d.deserialize_map(Visitor)
    }
}
