"""The model both worlds share: disks (block devices), file trees and container images."""
