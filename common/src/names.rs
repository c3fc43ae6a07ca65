//! Names of hosts, zones, clusters and tags.

/// Longest name accepted.
pub const MAX_NAME_LEN: usize = 253;

/// Validates a host name, zone, cluster or tag: 1..=253 characters of `[A-Za-z0-9._-]`.
/// `what` names the thing in the error ("zone", "tag", ...).
pub fn validate(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} {value:?} is {} characters long; at most {MAX_NAME_LEN} are allowed",
            value.len()
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} {value:?} contains {bad:?}; only letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses() {
        assert!(validate("tag", "ha-1.rack_2").is_ok());
        assert!(validate("tag", "").is_err());
        assert!(validate("tag", "a b").expect_err("space").contains("' '"));
        assert!(validate("tag", &"x".repeat(254)).is_err());
    }
}
