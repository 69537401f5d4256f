//! Store errors as the API's one error body: the mapping the daemon's routes use, kept beside
//! the errors so a new variant cannot be added without deciding its status.

use vireo_api::{ApiError, ApiErrorCode};

use crate::error::StoreError;

impl From<&StoreError> for ApiError {
    fn from(e: &StoreError) -> Self {
        let code = match e {
            StoreError::NameTaken { .. }
            | StoreError::MacTaken { .. }
            | StoreError::IdTaken { .. }
            | StoreError::IllegalTransition(_)
            | StoreError::JobEnded { .. }
            | StoreError::PoolNameTaken { .. }
            | StoreError::PoolNotEmpty { .. }
            | StoreError::InAnotherPool { .. } => ApiErrorCode::Conflict,
            StoreError::NotFound { .. }
            | StoreError::PoolNotFound { .. }
            | StoreError::NotAMember { .. } => ApiErrorCode::NotFound,
            StoreError::Spec(_) => ApiErrorCode::Invalid,
            // Faults of the host or the database, never of the request.
            StoreError::SchemaTooNew { .. }
            | StoreError::Locked { .. }
            | StoreError::Io { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Sqlite(_) => ApiErrorCode::Internal,
        };
        ApiError::new(code, e.to_string())
    }
}
