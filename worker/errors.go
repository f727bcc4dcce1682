package worker

import (
	"errors"
	"fmt"
)

var (
	// ErrInvalidRunID is returned for a run id that does not match ^[A-Za-z0-9_-]{1,64}$.
	ErrInvalidRunID = errors.New("worker: invalid run id")
	// ErrInvalidPhase is returned for a phase name that does not match ^[A-Za-z0-9_-]{1,32}$.
	ErrInvalidPhase = errors.New("worker: invalid phase")
	// ErrInvalidName is returned for a consumer name that does not match ^[A-Za-z0-9_-]{1,64}$.
	ErrInvalidName = errors.New("worker: invalid consumer name")
	// ErrInvalidSubject is returned by the subject parser for anything it did not build.
	ErrInvalidSubject = errors.New("worker: invalid subject")
	// ErrInvalidOption is returned by option constructors and Validate methods.
	ErrInvalidOption = errors.New("worker: invalid option")
	// ErrTooLarge is matched (errors.Is) by *TooLargeError: the message does not
	// fit the server's max_payload and the caller has to chunk it.
	ErrTooLarge = errors.New("worker: message exceeds max payload")
	// ErrHandlerPanic wraps a recovered panic of a task or message handler.
	ErrHandlerPanic = errors.New("worker: handler panicked")
	// ErrServerStart is returned when the embedded server does not become ready.
	ErrServerStart = errors.New("worker: embedded nats-server did not start")
)

// TooLargeError reports a message that does not fit the connection's max payload.
// It matches ErrTooLarge with errors.Is.
type TooLargeError struct {
	Subject string
	Size    int // payload plus encoded headers, in bytes
	Limit   int // the server's max_payload, in bytes
}

func (e *TooLargeError) Error() string {
	return fmt.Sprintf("worker: message on %s is %d bytes, max payload is %d", e.Subject, e.Size, e.Limit)
}

// Is makes errors.Is(err, ErrTooLarge) true.
func (e *TooLargeError) Is(target error) bool { return target == ErrTooLarge }
