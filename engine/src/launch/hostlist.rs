//! Slurm's hostlist syntax (`SLURM_JOB_NODELIST`): `gpu[001-004,010],login1,rack[1-2]-n[1-3]`.
//!
//! A list is comma-separated at the top level (commas inside brackets separate ranges). Each item
//! is literal text with any number of bracket groups; a group is a comma-separated list of
//! numbers and `lo-hi` ranges, expanded with the width of `lo` when it is zero-padded (`001-004`
//! gives `001`..`004`). Several groups in one item expand as their product, leftmost slowest,
//! as Slurm does.

/// Most host names a list may expand to (a typo like `n[0-99999999]` is refused, not allocated).
pub const MAX_HOSTS: usize = 1 << 16;

/// The host names of `list`, in order; an error says what is wrong and where.
pub fn expand(list: &str) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    for item in split_top(list)? {
        if item.is_empty() {
            return Err(format!("hostlist {list:?}: an empty host name"));
        }
        expand_item(list, item, &mut hosts)?;
    }
    if hosts.is_empty() {
        return Err(format!("hostlist {list:?}: no host"));
    }
    Ok(hosts)
}

/// The first host of `list`: Slurm's rank 0 runs there.
pub fn first(list: &str) -> Result<String, String> {
    // Expanding everything also checks the whole list; MAX_HOSTS bounds the cost.
    expand(list).map(|h| h[0].clone())
}

/// Splits at the commas outside brackets, checking that brackets pair up.
fn split_top(list: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(format!("hostlist {list:?}: nested '[' at byte {i}")),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(format!("hostlist {list:?}: ']' without '[' at byte {i}")),
            ',' if depth == 0 => {
                items.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("hostlist {list:?}: '[' without ']'"));
    }
    items.push(list[start..].trim());
    Ok(items)
}

/// Expands one item (text and bracket groups) onto `out`.
fn expand_item(list: &str, item: &str, out: &mut Vec<String>) -> Result<(), String> {
    let mut names = vec![String::new()];
    let mut rest = item;
    while !rest.is_empty() {
        let Some(open) = rest.find('[') else {
            names.iter_mut().for_each(|n| n.push_str(rest));
            break;
        };
        let text = &rest[..open];
        let close = open
            + rest[open..]
                .find(']')
                .expect("split_top paired the brackets");
        let values = expand_group(list, &rest[open + 1..close])?;
        if names.len().saturating_mul(values.len()) + out.len() > MAX_HOSTS {
            return Err(format!("hostlist {list:?}: more than {MAX_HOSTS} hosts"));
        }
        names = names
            .iter()
            .flat_map(|n| values.iter().map(move |v| format!("{n}{text}{v}")))
            .collect();
        rest = &rest[close + 1..];
    }
    out.extend(names);
    Ok(())
}

/// The values of one bracket group, `1,3,005-010`.
fn expand_group(list: &str, group: &str) -> Result<Vec<String>, String> {
    let bad = |what: &str| format!("hostlist {list:?}: [{group}] {what}");
    let mut values = Vec::new();
    for part in group.split(',').map(str::trim) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(bad(&format!("has {part:?}, not a number or a lo-hi range")));
        }
        let (a, b): (u64, u64) = match (lo.parse(), hi.parse()) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return Err(bad(&format!("has {part:?}, a number too large"))),
        };
        if a > b {
            return Err(bad(&format!("has {part:?}, a range that runs backwards")));
        }
        if b - a >= MAX_HOSTS as u64 || values.len() + (b - a) as usize >= MAX_HOSTS {
            return Err(bad(&format!("expands to more than {MAX_HOSTS} hosts")));
        }
        let width = if lo.len() > 1 && lo.starts_with('0') {
            lo.len()
        } else {
            0
        };
        values.extend((a..=b).map(|v| format!("{v:0width$}")));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_padding_lists_and_groups() {
        assert_eq!(expand("node1").unwrap(), ["node1"]);
        assert_eq!(
            expand("gpu[001-003,010]").unwrap(),
            ["gpu001", "gpu002", "gpu003", "gpu010"]
        );
        assert_eq!(
            expand("a[1-2],b,c[9-10]").unwrap(),
            ["a1", "a2", "b", "c9", "c10"]
        );
        assert_eq!(
            expand("rack[1-2]-n[01-02].ib").unwrap(),
            [
                "rack1-n01.ib",
                "rack1-n02.ib",
                "rack2-n01.ib",
                "rack2-n02.ib"
            ]
        );
        assert_eq!(expand("n[7]").unwrap(), ["n7"]);
        assert_eq!(expand(" x , y ").unwrap(), ["x", "y"]);
        assert_eq!(first("gpu[004-009]").unwrap(), "gpu004");
    }

    #[test]
    fn malformed_lists_say_what_is_wrong() {
        for (list, says) in [
            ("gpu[1-3", "without ']'"),
            ("gpu1-3]", "without '['"),
            ("gpu[[1]]", "nested"),
            ("gpu[3-1]", "backwards"),
            ("gpu[a-b]", "not a number"),
            ("gpu[1-]", "not a number"),
            ("a,,b", "empty host"),
            ("", "empty host"),
            ("n[0-99999999]", "more than"),
            ("n[0-300]x[0-300]", "more than"),
        ] {
            let e = expand(list).unwrap_err();
            assert!(e.contains(says), "{list:?}: {e}");
        }
    }
}
