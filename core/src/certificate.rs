//! What a certificate says about itself: whose it is, its serial number and
//! when it is valid; and when that deserves a warning. The three binaries
//! warn about their own certificates in the same words.

use std::time::Duration;

use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::identity::{Identity, IdentityError};

/// How long before its end a certificate's holder starts warning, unless
/// it renews itself sooner (see [`CertificateInfo::warn_from`]).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// The parts of a certificate Procurator acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub identity: Identity,
    /// Lowercase hex, no separators, no leading zero bytes: see [`normalize_serial`].
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

impl CertificateInfo {
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let identity = Identity::from_certificate_der(der)?;
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
        let validity = cert.validity();
        Ok(Self {
            identity,
            serial: normalize_serial(&hex::encode(cert.raw_serial())),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }

    /// The first certificate of a PEM file (a leaf before its chain).
    pub fn from_pem(pem: &[u8]) -> Result<Self, IdentityError> {
        let der = crate::tls::first_certificate_der(pem)
            .ok_or_else(|| IdentityError::Malformed("no PEM CERTIFICATE in it".into()))?;
        Self::from_der(&der)
    }

    pub fn lifetime_secs(&self) -> i64 {
        (self.not_after - self.not_before).max(0)
    }

    /// When its holder should renew it: two thirds into its lifetime, so a
    /// failing renewal has a third of it to be noticed and fixed.
    pub fn renew_at(&self) -> i64 {
        self.not_before + self.lifetime_secs() * 2 / 3
    }

    /// From when a warning is due: [`EXPIRY_WARNING`] before its end, or,
    /// for a certificate so short-lived that it renews itself later than
    /// that, only once that renewal is overdue.
    pub fn warn_from(&self) -> i64 {
        let warning = i64::try_from(EXPIRY_WARNING.as_secs()).unwrap_or(i64::MAX);
        (self.not_after - warning).max(self.renew_at())
    }

    pub fn expired_at(&self, now_secs: i64) -> bool {
        now_secs > self.not_after
    }

    /// A warning to log now, if one is due: it expired, or expires soon.
    pub fn expiry_warning(&self, now_secs: i64) -> Option<String> {
        if self.expired_at(now_secs) {
            Some(format!(
                "the certificate of {} expired on {}",
                self.identity,
                format_utc(self.not_after)
            ))
        } else if now_secs >= self.warn_from() {
            Some(format!(
                "the certificate of {} expires on {}, in {}",
                self.identity,
                format_utc(self.not_after),
                format_left(self.not_after - now_secs)
            ))
        } else {
            None
        }
    }
}

/// A serial as openssl (`4A3F…`), x509-parser (`4a:3f:…`) or this module
/// prints it, in this module's form: lowercase hex digits only, without
/// the leading zero bytes DER may add for the sign.
pub fn normalize_serial(serial: &str) -> String {
    let digits: String = serial
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else if trimmed.len() % 2 == 1 {
        format!("0{trimmed}")
    } else {
        trimmed.to_owned()
    }
}

/// Whether `serial` is a serial number as [`normalize_serial`] reads one.
pub fn is_serial(serial: &str) -> bool {
    let digits = serial.chars().filter(|c| *c != ':').count();
    (1..=64).contains(&digits) && serial.chars().all(|c| c == ':' || c.is_ascii_hexdigit())
}

/// Unix seconds as `2026-12-02T10:00:00Z`.
pub fn format_utc(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} (Unix seconds)"))
}

/// A duration as `90s`, `15m`, `12h`, `30d` (one number, one unit), for
/// the flags that take one.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?} is not a duration: give a number and s, m, h or d, e.g. 30d"
            ));
        }
    };
    let number: u64 = number.parse().map_err(|_| {
        format!("{text:?} is not a duration: give a number and s, m, h or d, e.g. 30d")
    })?;
    number
        .checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// A span of seconds in its largest whole unit: `13 days`, `5 hours`.
fn format_left(secs: i64) -> String {
    let (n, unit) = match secs {
        s if s >= 2 * 86_400 => (s / 86_400, "days"),
        s if s >= 2 * 3_600 => (s / 3_600, "hours"),
        s if s >= 120 => (s / 60, "minutes"),
        s => (s, "seconds"),
    };
    format!("{n} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;
    use crate::names::MachineName;

    fn info(not_before: i64, not_after: i64) -> CertificateInfo {
        CertificateInfo {
            identity: Identity::new(Role::Agent, MachineName::parse("m").unwrap()),
            serial: "01".into(),
            not_before,
            not_after,
        }
    }

    #[test]
    fn serials_are_read_in_every_printed_form() {
        for printed in ["4A:3F:00", "4a3f00", "00:4a:3f:00", "004A3F00"] {
            assert_eq!(normalize_serial(printed), "4a3f00", "{printed}");
            assert!(is_serial(printed));
        }
        assert_eq!(normalize_serial("0"), "0");
        assert_eq!(normalize_serial("f"), "0f");
        assert!(!is_serial("worker-1"));
        assert!(!is_serial(""));
    }

    #[test]
    fn long_lived_certificates_warn_two_weeks_before_short_lived_ones_when_renewal_is_overdue() {
        let day = 86_400;
        let long = info(0, 825 * day);
        assert_eq!(long.warn_from(), 811 * day);
        assert_eq!(long.expiry_warning(800 * day), None);
        let soon = long.expiry_warning(812 * day).unwrap();
        assert!(
            soon.contains("expires on") && soon.contains("13 days"),
            "{soon}"
        );
        let expired = long.expiry_warning(826 * day).unwrap();
        assert!(expired.contains("expired on"), "{expired}");

        // 30 days, renewed at day 20: silent until then, loud after.
        let short = info(0, 30 * day);
        assert_eq!(short.renew_at(), 20 * day);
        assert_eq!(short.expiry_warning(19 * day), None);
        assert!(short.expiry_warning(21 * day).is_some());
    }

    #[test]
    fn durations_are_a_number_and_a_unit() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "30", "d", "1.5h", "1h30m", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
    }
}
