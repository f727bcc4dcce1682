package model

const rusageThread = 1 // RUSAGE_THREAD
