// Measured process memory (Linux /proc): what runs report as their peak.
#pragma once
#include <cstddef>

namespace bioquant {

size_t peak_rss_bytes();     // VmHWM: the high-water mark of resident memory
size_t current_rss_bytes();  // VmRSS
// Starts a new peak: sets VmHWM to the current RSS (Linux >= 4.0, /proc/self/clear_refs "5"), so
// one process can measure several runs in turn. Returns false where the kernel does not allow it.
bool reset_peak_rss();

}  // namespace bioquant
