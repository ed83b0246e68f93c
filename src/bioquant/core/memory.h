// Measured process memory (Linux /proc): what runs report as their peak.
#pragma once
#include <cstddef>

namespace bioquant {

size_t peak_rss_bytes();     // VmHWM: the high-water mark of resident memory
size_t current_rss_bytes();  // VmRSS

}  // namespace bioquant
