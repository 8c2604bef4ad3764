//! Static segment lists (`CREATE SEGMENT … FROM CSV '…'`): the user ids in a CSV file.
//!
//! Owns [`read_user_list`]. The first line is always a header. The ids are taken from
//! the column named `user_id` when the header has one, else from the first column.
//! Ids are trimmed of surrounding whitespace; empty ids are skipped.

use std::collections::BTreeSet;

use crate::error::ConnectorError;
use crate::store::read_all;

/// Reads the set of user ids in a CSV file (local path or URL).
///
/// Errors ([`Fault::Input`](crate::Fault::Input)) name the file and, where it applies,
/// the line: an empty file (no header), a row with a different number of fields than
/// the header, text that is not UTF-8.
pub fn read_user_list(url: &str) -> Result<BTreeSet<String>, ConnectorError> {
    let bytes = read_all(url)?;
    parse_user_list(url, &bytes)
}

/// Parses CSV bytes as [`read_user_list`] does; `url` labels errors.
pub fn parse_user_list(url: &str, bytes: &[u8]) -> Result<BTreeSet<String>, ConnectorError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    let headers = reader.headers().map_err(|e| csv_error(url, &e))?.clone();
    if headers.is_empty() {
        return Err(ConnectorError::input(
            url,
            "the file is empty; expected a header line with a user_id column",
        ));
    }
    let column = headers
        .iter()
        .position(|h| h.trim_start_matches('\u{feff}').trim() == "user_id")
        .unwrap_or(0);
    let mut ids = BTreeSet::new();
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {
                if let Some(id) = record.get(column).map(str::trim) {
                    if !id.is_empty() {
                        ids.insert(id.to_string());
                    }
                }
            }
            Ok(false) => break,
            Err(e) => return Err(csv_error(url, &e)),
        }
    }
    Ok(ids)
}

fn csv_error(url: &str, e: &csv::Error) -> ConnectorError {
    let line = e.position().map(|p| p.line()).or(match e.kind() {
        csv::ErrorKind::UnequalLengths { pos, .. } => pos.as_ref().map(|p| p.line()),
        csv::ErrorKind::Utf8 { pos, .. } => pos.as_ref().map(|p| p.line()),
        _ => None,
    });
    let message = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("malformed CSV: a row has {len} fields but the header has {expected_len}"),
        csv::ErrorKind::Utf8 { .. } => "malformed CSV: the text is not valid UTF-8".to_string(),
        _ => format!("malformed CSV: {e}"),
    };
    match line {
        Some(line) => ConnectorError::input_at(url, line, message),
        None => ConnectorError::input(url, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn takes_the_user_id_column_or_the_first() {
        let with = "email,user_id\na@x.com,u1\nb@x.com, u2 \nc@x.com,\n";
        assert_eq!(
            parse_user_list("f.csv", with.as_bytes()).unwrap(),
            ids(&["u1", "u2"])
        );
        let without = "id,email\nu1,a@x.com\nu1,a@x.com\n\"u,3\",c\n";
        assert_eq!(
            parse_user_list("f.csv", without.as_bytes()).unwrap(),
            ids(&["u1", "u,3"])
        );
        let bom = "\u{feff}user_id\nu9\n";
        assert_eq!(
            parse_user_list("f.csv", bom.as_bytes()).unwrap(),
            ids(&["u9"])
        );
    }

    #[test]
    fn malformed_files_name_file_and_line() {
        let err = parse_user_list("lists/beta.csv", b"user_id,email\nu1,a\nu2\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("lists/beta.csv") && text.contains("line 3"),
            "{text}"
        );
        assert_eq!(err.fault(), crate::Fault::Input);
        let err = parse_user_list("b.csv", b"user_id\nu1\n\xff\xfe\n").unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");
        assert!(parse_user_list("e.csv", b"").is_err());
    }
}
