//! How an operator should feel about a disk, as every role's status view
//! says it.

/// Worst first when compared: `Crit > Warn > Ok`.
#[derive(serde::Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "WARN")]
    Warn,
    #[serde(rename = "CRIT")]
    Crit,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "OK",
            Health::Warn => "WARN",
            Health::Crit => "CRIT",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
