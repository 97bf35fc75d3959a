//! Pages of rows in name order, for the list RPCs: bounded in rows, in
//! bytes, and in rows read when a name pattern filters them
//! (`procurator_core::limits`).

use procurator_core::limits::{MAX_PAGE_BYTES, MAX_PAGE_ROWS, MAX_PAGE_SCAN_ROWS};
use procurator_core::pattern::NamePattern;

use super::StoreError;

/// Which page: the rows after `after`, at most `size`, whose names match
/// `name` when given.
#[derive(Debug, Clone, PartialEq)]
pub struct PageQuery {
    pub after: String,
    pub size: u32,
    pub name: Option<NamePattern>,
}

impl PageQuery {
    pub fn first(size: u32) -> Self {
        Self {
            after: String::new(),
            size,
            name: None,
        }
    }
}

/// One page, and the name to go on after when more may follow.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_after: Option<String>,
}

/// Reads rows through `fetch(after, from, limit)` — up to `limit` rows
/// named after `after` and not before `from`, in name order — until the
/// page is full, the rows run out, or a pattern's scan budget is spent.
pub(super) fn collect<T: prost::Message>(
    query: &PageQuery,
    name_of: impl Fn(&T) -> &str,
    mut fetch: impl FnMut(&str, &str, u32) -> Result<Vec<T>, StoreError>,
) -> Result<Page<T>, StoreError> {
    let size = query.size.clamp(1, MAX_PAGE_ROWS) as usize;
    // Every match starts with the pattern's literal prefix, and names with
    // one prefix sort together: start there, stop past them.
    let prefix = query.name.as_ref().map_or("", NamePattern::literal_prefix);
    let chunk = if query.name.is_some() {
        MAX_PAGE_ROWS
    } else {
        // One more than the page, to know whether another follows.
        u32::try_from(size + 1).unwrap_or(MAX_PAGE_ROWS)
    };
    let (mut items, mut bytes, mut scanned) = (Vec::new(), 0, 0);
    let mut cursor = query.after.clone();
    loop {
        let rows = fetch(&cursor, prefix, chunk)?;
        let exhausted = rows.len() < chunk as usize;
        for row in rows {
            let name = name_of(&row).to_owned();
            if !name.starts_with(prefix) {
                return Ok(Page {
                    items,
                    next_after: None,
                });
            }
            if query.name.as_ref().is_none_or(|p| p.matches(&name)) {
                let len = row.encoded_len();
                if items.len() == size || (!items.is_empty() && bytes + len > MAX_PAGE_BYTES) {
                    // This row starts the next page.
                    return Ok(Page {
                        items,
                        next_after: Some(cursor),
                    });
                }
                bytes += len;
                items.push(row);
            }
            cursor = name;
            scanned += 1;
            if query.name.is_some() && scanned >= MAX_PAGE_SCAN_ROWS {
                return Ok(Page {
                    items,
                    next_after: Some(cursor),
                });
            }
        }
        if exhausted {
            return Ok(Page {
                items,
                next_after: None,
            });
        }
    }
}
