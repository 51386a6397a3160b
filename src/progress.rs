//! Progress bars of the long jobs (trace, steer, transcoder training). indicatif draws them on
//! stderr only when it is a terminal; [`set_shown`] turns them off altogether (the Python
//! package's `progress=False`).

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget};

static HIDDEN: AtomicBool = AtomicBool::new(false);

/// Shows (the default) or hides the progress bars created from now on, process-wide.
pub fn set_shown(shown: bool) {
    HIDDEN.store(!shown, Ordering::Relaxed);
}

/// Whether progress bars are shown (see [`set_shown`]).
pub fn shown() -> bool {
    !HIDDEN.load(Ordering::Relaxed)
}

/// A bar of `len` steps on stderr, or a hidden one when bars are turned off.
pub fn bar(len: u64) -> ProgressBar {
    if shown() {
        ProgressBar::new(len)
    } else {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden())
    }
}
