"""Reading images and datasets: folders, benchmark layouts, RecordIO, GLDv2 preparation."""
