//! The one error shape of the API: `{"code": "...", "message": "..."}`, whatever the route.
//! The code fixes the HTTP status, so the daemon cannot answer 500 for bad input by accident.

use serde::{Deserialize, Serialize};

use crate::state::IllegalTransition;
use crate::validate::SpecError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorCode {
    /// Malformed JSON or unknown fields.
    BadRequest,
    Unauthorized,
    NotFound,
    /// Illegal state transition, or a name already taken.
    Conflict,
    /// Well-formed but semantically invalid (sizes, paths, names).
    Invalid,
    /// A fault of the daemon itself, never of the input.
    Internal,
}

impl ApiErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ApiErrorCode::BadRequest => 400,
            ApiErrorCode::Unauthorized => 401,
            ApiErrorCode::NotFound => 404,
            ApiErrorCode::Conflict => 409,
            ApiErrorCode::Invalid => 422,
            ApiErrorCode::Internal => 500,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{message}")]
pub struct ApiError {
    pub code: ApiErrorCode,
    /// One line naming the offending value and what to do.
    pub message: String,
}

impl ApiError {
    pub fn new(code: ApiErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ApiError::new(ApiErrorCode::Invalid, e.to_string())
    }
}

impl From<IllegalTransition> for ApiError {
    fn from(e: IllegalTransition) -> Self {
        ApiError::new(ApiErrorCode::Conflict, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{transition, Action, VmState};

    #[test]
    fn json_shape_and_statuses() {
        let e: ApiError = transition(&VmState::Off, &Action::Pause)
            .unwrap_err()
            .into();
        assert_eq!(e.code.http_status(), 409);
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"code":"conflict","message":"cannot pause a VM that is off"}"#
        );
        let spec_err = crate::validate::validate_name("name", "a/b").unwrap_err();
        assert_eq!(ApiError::from(spec_err).code.http_status(), 422);
    }
}
